"""What a valid S²FT adapter is, checked the same way by every consumer, with no PEFT or vLLM import.

PEFT loading (``s2ft_plugin``), vLLM's front end and workers (``vllm_ext.validation``, ``vllm_ext.loader``) and the
converter (``vllm_ext.convert``) accept exactly the same adapters, with the same messages:

- ``s2ft_format.config``: the values an adapter config may hold (``S2FTConfig`` applies them too), how many units
  it selects per block, and which modules it targets (PEFT's matching rules);
- ``s2ft_format.tensors``: each adapted module's indices and delta against the projection they adapt, and the
  adapter's tensors against the modules its config targets (nothing missing, nothing without a place).

vLLM imports these in every process, so they import only torch and the standard library: PEFT (and bitsandbytes,
which PEFT imports) stay out of vLLM's workers.
"""
