"""Recipe files: mixprec's recipe YAML and exllamav3's override YAML.
"""
