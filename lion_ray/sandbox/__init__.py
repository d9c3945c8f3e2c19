"""The sandbox world: an OpenAI-compatible teacher, referee and generator over checkable tasks.

``tasks`` (pure) defines the task families; ``world`` (pure) answers the three call kinds;
``server`` puts them behind real HTTP with rate limits and fault injection.
"""
