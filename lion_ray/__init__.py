"""lion-ray: Ray-distributed adversarial distillation (the Lion method).

The loop, as the paper names it, lives in three stage modules:
``imitation`` -> ``discrimination`` -> ``generation``, walked by ``driver``.
Pure logic (prompts, parsing, pools, filters, dedup) is in ``lion_ray.logic``; Ray plumbing
(API actors, inference, training, serving) is in ``lion_ray.engines``.
"""

__version__ = "0.1.0"
