"""Text: tokenizers (SentencePiece and Hugging Face tokenizers), chat templates, lines, corpora and token shards."""
