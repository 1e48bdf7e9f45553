"""Data shipped with warm-hub: the word lists of the synthetic review task (`reviews_lexicon.json`) and its
deterministic generator (`reviews.py`), from which the offline demo builds its tokenizer, base model and pairs.
"""
