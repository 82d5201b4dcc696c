"""Data: math benchmark / training-set loaders, the paper's prompt, the grain input pipeline, and the
synthetic arithmetic task.

Import the submodules directly; this package imports nothing so that ``import conspo_jax.data.x`` stays
cheap (grain and pyarrow load only with the modules that need them):
  conspo_jax.data.math_data   load_benchmark, load_records, load_hf, BENCHMARKS
  conspo_jax.data.files       read_rows, DataError, default_data_dir (the data directory)
  conspo_jax.data.prompts     build_prompt, encode_prompt
  conspo_jax.data.pipeline    make_prompt_dataset (grain; checkpointable iterator)
  conspo_jax.data.arith       the synthetic arithmetic task
"""
