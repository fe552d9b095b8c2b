"""Run configuration and the glue that runs experiments on Flower's engines."""
