"""Configurations for the memory validation: mixer mixes, widths, lengths, batch rows, checkpointing, and one
where parameters and optimizer state dominate. (overrides, rows, seq_len, document length)"""

BASE = ["model.vocab_size=512", "model.loss_chunk_tokens=512"]

CONFIGS = {
    "hybrid_3to1": (BASE + ["model.d_model=128", "model.n_heads=4", "model.n_kv_heads=2", "model.ffn_dim=320",
                            "model.n_layers=4", "model.pattern=GGGA"], 2, 1024, 256),
    "hybrid_3to1_checkpointed": (BASE + ["model.d_model=128", "model.n_heads=4", "model.n_kv_heads=2",
                                         "model.ffn_dim=320", "model.n_layers=4", "model.pattern=GGGA",
                                         "model.activation_checkpointing=true"], 2, 1024, 256),
    "attention_wide": (BASE + ["model.d_model=192", "model.n_heads=6", "model.n_kv_heads=2", "model.ffn_dim=512",
                               "model.n_layers=3", "model.pattern=A"], 1, 768, 300),
    "linear_long": (BASE + ["model.d_model=64", "model.n_heads=2", "model.n_kv_heads=1", "model.ffn_dim=192",
                            "model.n_layers=4", "model.pattern=LLLA"], 1, 2048, 700),
    "conv_rows": (BASE + ["model.d_model=96", "model.n_heads=4", "model.n_kv_heads=4", "model.ffn_dim=256",
                          "model.n_layers=4", "model.pattern=GCGA", "model.mixers={conv: {kernel_size: 8}}"],
                  4, 512, 128),
    "gdn_heads": (BASE + ["model.d_model=128", "model.n_heads=4", "model.n_kv_heads=4", "model.ffn_dim=352",
                          "model.n_layers=3", "model.pattern=GGA",
                          "model.mixers={gdn: {n_heads: 2, head_k_dim: 48, head_v_dim: 96}}"], 1, 1024, 512),
    "parameters_dominate": (["model.vocab_size=8192", "model.loss_chunk_tokens=128", "model.d_model=256",
                             "model.n_heads=4", "model.n_kv_heads=2", "model.ffn_dim=704", "model.n_layers=2",
                             "model.pattern=GA", "model.tie_embeddings=false"], 2, 128, 64),
    "big_vocab_logits": (["model.vocab_size=4096", "model.loss_chunk_tokens=1024", "model.d_model=64",
                          "model.n_heads=2", "model.n_kv_heads=2", "model.ffn_dim=192", "model.n_layers=2",
                          "model.pattern=GA"], 2, 1024, 1024),
}
