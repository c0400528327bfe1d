"""`make up`: the broker, every service and the simulated users on one machine."""
