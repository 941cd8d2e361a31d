"""Recipes: the experiments that produce ``docs/results``, built on the library and run by the
CLI. :mod:`.translation` (+ :mod:`.numwords`, the embedded English -> French number task):
``ferrolm train seq2seq``; :mod:`.finetune_experiment`: ``ferrolm finetune experiment``
(fine-tuning methods against in-context learning); :mod:`.icl_science`:
``ferrolm icl experiment`` (in-context regression, associative recall, induction heads,
few-shot classification). Each writes JSON and a plot through :mod:`ferrolm._plot`.
"""
