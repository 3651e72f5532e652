"""Real-model recipes: PEFT method comparison on MetaMathQA/GSM8K and the paper's commonsense set-up."""
