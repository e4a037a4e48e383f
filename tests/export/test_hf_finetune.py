"""Fine-tuning and serving a hybrid export the usual Hugging Face way: `Trainer` with the standard causal-LM
collator (padded batches), with and without gradient checkpointing, a peft LoRA adapter over every layer type,
and a batched text-generation `pipeline` — each checked against lctrain or against the unbatched export."""
import pytest
import torch

from lctrain.export.hf_export import export_model
from tests.export.conftest import tiny_model

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
from transformers import (AutoModelForCausalLM, AutoTokenizer, DataCollatorForLanguageModeling,  # noqa: E402
                          Trainer, TrainingArguments, pipeline)

PATTERN = "AGLSBCMT"
MIXERS = {"swa": {"window": 5, "sink": 1}, "conv": {"kernel_size": 3}, "based": {"feature_dim": 4},
          "landmark": {"block_size": 6},
          "titans": {"variant": "mac", "segment_len": 8, "chunk_size": 3, "persistent_tokens": 2, "window": 5}}
TEXTS = ["def f(x):\n    return x + 1\n", "import os", "class A:\n    pass\n\n\nprint(A())",
         "for i in range(3): print(i)", "x = [1, 2, 3]", "with open(p) as f:\n    data = f.read()\n",
         "# comment", "while True:\n    break"]


@pytest.fixture(scope="module")
def export(tokenizer, tmp_path_factory):
    model = tiny_model(tokenizer.vocab_size + 1, PATTERN, mixers=MIXERS, init_std=0.1)
    return model, export_model(model, tokenizer, tmp_path_factory.mktemp("finetune"), max_positions=64)


def load(out):
    return AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True, dtype=torch.float32)


def right_padding_tokenizer(out):
    hf_tokenizer = AutoTokenizer.from_pretrained(out, trust_remote_code=True)
    hf_tokenizer.padding_side = "right"  # the training convention (labels -100 after each row)
    return hf_tokenizer


def train(hf, hf_tokenizer, tmp_path, steps=3, checkpointing=False, lr=1e-2):
    dataset = [hf_tokenizer(text) for text in TEXTS]
    # transformers 5 renamed the option (the old name is a deprecated alias).
    flag = ("activation_checkpointing" if "activation_checkpointing" in TrainingArguments.__dataclass_fields__
            else "gradient_checkpointing")
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=steps,
                             learning_rate=lr, logging_steps=1, save_strategy="no", report_to=[], use_cpu=True,
                             disable_tqdm=True, seed=0, dataloader_num_workers=0, **{flag: checkpointing})
    trainer = Trainer(model=hf, args=args, train_dataset=dataset,
                      data_collator=DataCollatorForLanguageModeling(hf_tokenizer, mlm=False))
    trainer.train()
    return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]


def test_collated_padded_loss_equals_lctrain_per_row(tokenizer, export):
    """The standard collator pads a batch and sets labels -100 at the padding: the loss is lctrain's loss over the
    real tokens of all rows together."""
    model, out = export
    hf_tokenizer = right_padding_tokenizer(out)
    batch = DataCollatorForLanguageModeling(hf_tokenizer, mlm=False)([hf_tokenizer(t) for t in TEXTS[:4]])
    assert (batch["attention_mask"] == 0).any()
    with torch.no_grad():
        loss = load(out).eval()(**batch).loss
        total, count = 0.0, 0
        for text in TEXTS[:4]:
            ids = torch.tensor([hf_tokenizer(text).input_ids])
            result = model(ids, labels=torch.cat([ids[:, 1:], torch.full_like(ids[:, :1], -100)], dim=1))
            total, count = total + result.loss_sum, count + result.n_targets
    torch.testing.assert_close(loss, total / count, rtol=1e-5, atol=1e-5)


def test_trainer_runs_with_and_without_gradient_checkpointing(export, tmp_path):
    _, out = export
    hf_tokenizer = right_padding_tokenizer(out)
    trained = {}
    for checkpointing in (False, True):
        hf = load(out)
        before = {n: p.detach().clone() for n, p in hf.named_parameters()}
        losses = train(hf, hf_tokenizer, tmp_path / str(checkpointing), checkpointing=checkpointing)
        assert len(losses) == 3 and all(torch.isfinite(torch.tensor(losses)))
        assert hf.model.gradient_checkpointing == checkpointing
        assert any(not torch.equal(before[n], p) for n, p in hf.named_parameters())
        trained[checkpointing] = dict(hf.named_parameters())
    # Recomputing each layer in the backward pass gives the same gradients, hence the same weights.
    for name, param in trained[False].items():
        torch.testing.assert_close(trained[True][name], param, rtol=1e-4, atol=1e-5, msg=name)


def test_lora_adapter_over_every_layer_type(export, tmp_path):
    _, out = export
    hf = load(out)
    targets = hf.lora_target_modules()
    for expected in ("q_proj", "a_proj", "u_proj", "in_proj", "mem_qkv", "attn_qkv", "down_proj"):
        assert expected in targets  # gdn, linear, conv and titans projections besides attention's
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets, lora_dropout=0.0, task_type="CAUSAL_LM",
                             init_lora_weights=False)  # random B: the adapter changes the output from step 0
    lora = peft.get_peft_model(hf, config)
    adapted = {n.split(".base_model.model.", 1)[-1] for n, _ in lora.named_modules() if n.endswith("lora_A")}
    for kind, prefix in (("gdn", "layers.1.mixer."), ("conv", "layers.5.mixer."), ("titans", "layers.7.mixer.")):
        assert any(prefix in name for name in adapted), kind
    frozen = {n: p.detach().clone() for n, p in lora.named_parameters() if not p.requires_grad}
    adapter = {n: p.detach().clone() for n, p in lora.named_parameters() if p.requires_grad}
    assert adapter and all("lora_" in n for n in adapter)

    losses = train(lora, right_padding_tokenizer(out), tmp_path, checkpointing=True)
    assert all(torch.isfinite(torch.tensor(losses)))
    params = dict(lora.named_parameters())
    assert all(torch.equal(params[n], p) for n, p in frozen.items())
    assert all(not torch.equal(params[n], p) for n, p in adapter.items())

    ids = torch.tensor([[5, 17, 33, 8, 90, 12, 41, 7]])
    lora.eval()
    with torch.no_grad():
        adapted_logits = lora(ids).logits
        merged = lora.merge_and_unload()
        torch.testing.assert_close(merged(ids).logits, adapted_logits, rtol=0, atol=1e-4)


def test_batched_pipeline_equals_one_prompt_at_a_time(export):
    _, out = export
    hf = load(out).eval()
    hf_tokenizer = AutoTokenizer.from_pretrained(out, trust_remote_code=True)
    assert hf_tokenizer.padding_side == "left"
    generator = pipeline("text-generation", model=hf, tokenizer=hf_tokenizer)
    prompts = ["def f(x):", "import", "class A:\n    def g(self):"]
    options = dict(max_new_tokens=5, do_sample=False, return_full_text=False)
    batched = generator(prompts, batch_size=3, **options)
    for prompt, result in zip(prompts, batched):
        assert result[0]["generated_text"] == generator(prompt, **options)[0]["generated_text"], prompt
