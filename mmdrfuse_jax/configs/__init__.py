"""Training configurations (`get_config()` files): the defaults and the published recipes."""
