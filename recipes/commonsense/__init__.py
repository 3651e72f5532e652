"""The paper's commonsense-reasoning set-up (commonsense-170k, eight multiple-choice benchmarks) with TRL."""
