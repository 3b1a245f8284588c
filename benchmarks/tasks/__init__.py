"""The benchmarks' tasks: `chain_sums` (`benchmarks/learning_pretrained.py`) and `word_problems`
(`benchmarks/learning_smollm2.py`). The quickstart's toy task is the library's own, `hpt_trl.toy_task`."""
