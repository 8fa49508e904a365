"""FlexGate's training kit: the data owner's side of FlexOlmo (DESIGN.md, "Training kit").

Corpora and held-out splits, ``model pretrain`` (public model and tokenizer), ``expert embed``,
``expert train`` (coordinated training against the frozen public model), ``model merge``,
``model router-tune``, ``model eval`` and ``demo build``. It trains the engine's own model
classes, so what is trained is what is served. It imports the engine (and ``contracts``) only;
nothing imports it: ``gateway.cli`` loads its commands lazily by name.
"""
