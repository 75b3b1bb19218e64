"""The model a stage works on: per-family tables (arch), weight groups (model map), local checkpoint loading and
the token windows of every data role.
"""
