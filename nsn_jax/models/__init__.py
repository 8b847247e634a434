"""Model families (mlp, llama, bert), task heads, and `build.build_model(config)`."""
