"""SmallGPT: a GPT-2-style language model and the pipeline around it.

text -> tokenizer -> data (prepare/loader) -> model -> train -> generate -> serve
"""

__version__ = "0.1.0"
