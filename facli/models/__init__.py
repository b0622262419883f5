"""What model, loaded from where: the Llama-family decoder and everything that finds and reads it.

resolve turns `--model` (a checkpoint folder, a .gguf file, a recipe name, random-demo, or
nothing for the default) into files and a config: default_model, demo (the random model),
gguf_checkpoint (a GGUF file converted into the cache folder) and recipe_loader (model and
hardware recipes) each answer one of those. config is the architecture (ModelConfig), read with
json_fields' checks; checkpoint reads safetensors lazily, each rank only its slice; tokenizer
loads the tokenizer and detokenizes as text streams. llama is the decoder itself and rope its
rotary embeddings; neither knows where its weights or KV cache came from.
"""
