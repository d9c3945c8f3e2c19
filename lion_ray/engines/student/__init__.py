"""The student engine, in one wing (each module imports only those listed before it):

- ``wire``: OpenAI request models, errors, SSE chunks;
- ``guard``: API keys that fail closed, the body limit;
- ``rows``: the answer and loss rows every student stage gets back;
- ``runs``: what a replica reads from a run directory;
- ``backend``: the ``StudentBackend`` protocol and the one prompt-cutting rule;
- ``hf``, ``vllm``: the two backends; ``loading``: the one place a backend is chosen;
- ``replica``: ``Replica``, one loaded student's lifecycle (swap, lease, drain, sleep, the
  stage row API), a plain class;
- ``routes``: the HTTP routes and the Serve deployment, a shell around ``Replica``;
- ``app``: deploying it (``lion-ray serve``, ``serve run``, RayService);
- ``engine``: ``StudentEngine``, the run's one engine that every stage reaches.
"""
