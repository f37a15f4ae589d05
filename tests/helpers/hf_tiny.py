"""Tiny random HF models written with transformers' PyTorch classes: the reference for parity tests."""
import torch
import transformers

FAMILIES = {
    "llama_gqa_rope3": dict(model_type="llama", kw=dict(
        num_key_value_heads=2, tie_word_embeddings=False,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 64}, rope_theta=500000.0)),
    "llama_tied": dict(model_type="llama", kw=dict(num_key_value_heads=4, tie_word_embeddings=True)),
    "qwen2_bias": dict(model_type="qwen2", kw=dict(num_key_value_heads=2, tie_word_embeddings=True)),
    "qwen2_untied": dict(model_type="qwen2", kw=dict(num_key_value_heads=1, tie_word_embeddings=False)),
    "qwen3_qknorm": dict(model_type="qwen3", kw=dict(num_key_value_heads=2, head_dim=24, tie_word_embeddings=True)),
    "qwen3_untied": dict(model_type="qwen3", kw=dict(num_key_value_heads=4, head_dim=16, tie_word_embeddings=False)),
}


def make_hf_model(family: str, seed: int = 0, vocab: int = 211, hidden: int = 64, layers: int = 2):
    spec = FAMILIES[family]
    cls = {"llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
           "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
           "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM)}[spec["model_type"]]
    cfg = cls[0](vocab_size=vocab, hidden_size=hidden, intermediate_size=112, num_hidden_layers=layers,
                 num_attention_heads=4, max_position_embeddings=256, rms_norm_eps=1e-6,
                 bos_token_id=1, eos_token_id=2, pad_token_id=0, **spec["kw"])
    torch.manual_seed(seed)
    model = cls[1](cfg).eval()
    with torch.no_grad():  # HF inits norms to 1 and biases to 0: randomise them so parity means something
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))
    return model


def hf_logprobs(model, tokens, attn_mask):
    """log p(token t+1 | <= t) from the PyTorch model, positions counted over real tokens (left padding ok)."""
    t = torch.as_tensor(tokens, dtype=torch.long)
    m = torch.as_tensor(attn_mask, dtype=torch.long)
    pos = (m.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        logits = model(input_ids=t, attention_mask=m, position_ids=pos).logits.float()
    lp = torch.log_softmax(logits[:, :-1], -1).gather(-1, t[:, 1:, None])[..., 0]
    return (lp * m[:, 1:]).numpy()


def save_tiny_tokenizer(d, vocab: int = 211):
    """A word-level tokenizer over the words w3..w{vocab-1} (+ [PAD], <s>, </s>), saved in HF layout."""
    from tokenizers import Tokenizer, models, pre_tokenizers, decoders
    words = {"[PAD]": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, vocab)}}
    tok = Tokenizer(models.WordLevel(words, unk_token="[PAD]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                                pad_token="[PAD]")
    fast.save_pretrained(d)
    return fast
