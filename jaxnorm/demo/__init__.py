"""The jaxnorm demo: ``python -m jaxnorm.demo``."""
