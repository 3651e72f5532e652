"""MetaMathQA -> GSM8K method comparison in the experiment-folder format of PEFT's method_comparison suite."""
