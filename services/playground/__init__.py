"""The playground: a chat page where a person talks to the served policy and rates answers."""
