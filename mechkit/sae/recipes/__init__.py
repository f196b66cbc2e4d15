"""Recipes that trained the dictionaries shipped in ``mechkit/sae/trained/``.

Each recipe is a script (``python -m mechkit.sae.recipes.train_smollm2_topk``) that reads top
to bottom: corpus, activations, config, training, held-out evaluation, saving with a
``record.json`` of the figures.
"""
