"""kestrel's optimizers in the Hugging Face Trainer: a tiny LlamaForCausalLM trained with
`Trainer(..., optimizers=(kestrel optimizer, scheduler))`, checkpointed, resumed with `resume_from_checkpoint`
(the Trainer reloads the optimizer's state with torch.load(weights_only=True)), ends bit-identical to an
uninterrupted run; AdamW8bit, PagedAdamW8bit (paged only on CUDA: on the CPU its states are ordinary tensors) and
Lion8bit."""

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

import kestrel.optim  # noqa: E402


class Tokens(torch.utils.data.Dataset):
    def __init__(self, n=24, length=17, vocab=61):
        self.data = torch.randint(0, vocab, (n, length), generator=torch.Generator().manual_seed(7))

    def __len__(self):
        return len(self.data)

    def __getitem__(self, i):
        return {"input_ids": self.data[i], "labels": self.data[i]}


def tiny_llama():
    config = transformers.LlamaConfig(
        vocab_size=61,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config)


def train(out, optimizer_name, max_steps, resume=False, save_steps=None):
    model = tiny_llama()
    # min_8bit_size=0: every tensor of the tiny model gets 8-bit states (the default keeps small ones in 32 bits)
    optimizer = getattr(kestrel.optim, optimizer_name)(model.parameters(), lr=3e-3, min_8bit_size=0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 / (1 + step))
    args = transformers.TrainingArguments(
        output_dir=str(out),
        max_steps=max_steps,
        per_device_train_batch_size=4,
        save_steps=save_steps or 10**6,
        save_strategy="steps",
        logging_strategy="no",
        report_to=[],
        use_cpu=True,
        seed=0,
        data_seed=0,
        dataloader_num_workers=0,
        disable_tqdm=True,
    )
    trainer = transformers.Trainer(model=model, args=args, train_dataset=Tokens(), optimizers=(optimizer, scheduler))
    trainer.train(resume_from_checkpoint=resume)
    return model, optimizer


@pytest.mark.parametrize("optimizer_name", ["AdamW8bit", "PagedAdamW8bit", "Lion8bit"])
def test_resume_from_checkpoint_is_bit_identical(optimizer_name, tmp_path):
    straight, straight_opt = train(tmp_path / "straight", optimizer_name, max_steps=6)
    train(tmp_path / "resumed", optimizer_name, max_steps=3, save_steps=3)
    checkpoint = tmp_path / "resumed" / "checkpoint-3"
    state = torch.load(checkpoint / "optimizer.pt", weights_only=True)  # as the Trainer loads it
    assert state["state"], "the checkpoint holds the optimizer's state"
    packed = [s.get("__bnb_optimizer_quant_state__", s) for s in state["state"].values()]  # bnb's checkpoint form
    assert all(s["state1"].dtype == torch.uint8 for s in packed), "8-bit states"
    resumed, resumed_opt = train(tmp_path / "resumed", optimizer_name, max_steps=6, resume=str(checkpoint))
    assert int(next(iter(resumed_opt.state.values()))["step"]) == 6  # the resumed run took steps 4..6
    for (name, a), b in zip(straight.named_parameters(), resumed.parameters()):
        assert torch.equal(a, b), name
    for p_a, p_b in zip(straight.parameters(), resumed.parameters()):
        for key, value in straight_opt.state[p_a].items():
            other = resumed_opt.state[p_b][key]
            assert torch.equal(value, other) if isinstance(value, torch.Tensor) else value == other, key
