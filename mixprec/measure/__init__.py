"""The measure stage: the end-to-end KL damage of every group at every width, stored as a shared job table.
"""
