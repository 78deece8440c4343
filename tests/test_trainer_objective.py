"""ESAMTrainer differentiates the Trainer's own loss, for every common kind of Hugging Face model.

Each family is a tiny random-initialised float64 model built from a config (no downloads, no
dropout) with data shaped like its real use. Against independent references:
- SAM (beta = gamma = 1) equals a hand-written SAM loop on the model's own Trainer loss
  (`model(**batch, num_items_in_batch=N).loss`, N being what the Trainer passed);
- SAM at rho = 1e-9 continues plain `Trainer` training (rho = 0);
- with gamma < 1 the descent pass sees exactly the k examples whose loss, computed one example at
  a time, rises most from w to w + e.
"""

from __future__ import annotations

import dataclasses
import inspect
from typing import Any, Callable

import pytest
import torch
import torch.nn.functional as F
import transformers
from torch import nn
from transformers import Trainer

from esam_hf import ESAMTrainer
from esam_hf.losses import unwrap_model

from helpers import SequentialMixin, make_args

T = 10  # padded sequence length
CLASS_WEIGHTS = torch.tensor([1.0, 3.0, 0.5], dtype=torch.float64)


def _tokens(n, seed, vocab=50, low=3):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(low, vocab, (n, T), generator=g)
    lengths = torch.randint(3, T + 1, (n,), generator=g)
    mask = (torch.arange(T)[None] < lengths[:, None]).long()
    return ids * mask, mask, g  # pad id 0


def _rows(**columns):
    n = len(next(iter(columns.values())))
    return [{k: v[i] for k, v in columns.items()} for i in range(n)]


def _seeded(build):
    def fresh():
        torch.manual_seed(0)
        return build().double()
    return fresh


def _bert_config(**kw):
    return transformers.BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                   intermediate_size=16, max_position_embeddings=32, hidden_dropout_prob=0.0,
                                   attention_probs_dropout_prob=0.0, **kw)


def _decoder_config(cls, **kw):
    return cls(vocab_size=50, hidden_size=16, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2,
               num_key_value_heads=1, max_position_embeddings=32, **kw)


def seq_cls_data(n=32, seed=0, kind="single"):
    ids, mask, g = _tokens(n, seed)
    if kind == "single":
        labels = torch.randint(0, 3, (n,), generator=g)
    elif kind == "multi":
        labels = torch.randint(0, 2, (n, 3), generator=g).double()
    else:
        labels = torch.randn(n, generator=g, dtype=torch.float64)
    return _rows(input_ids=ids, attention_mask=mask, labels=labels)


def token_cls_data(n=32, seed=0):
    ids, mask, g = _tokens(n, seed)
    labels = torch.randint(0, 3, (n, T), generator=g).masked_fill(mask == 0, -100)
    return _rows(input_ids=ids, attention_mask=mask, labels=labels)


def clm_data(n=32, seed=0):
    ids, mask, _ = _tokens(n, seed)
    return _rows(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100))


def seq2seq_data(n=32, seed=0):
    ids, mask, g = _tokens(n, seed)
    target = torch.randint(3, 50, (n, 6), generator=g)
    target_len = torch.randint(2, 7, (n,), generator=g)
    labels = target.masked_fill(torch.arange(6)[None] >= target_len[:, None], -100)
    return _rows(input_ids=ids, attention_mask=mask, labels=labels)


def image_data(n=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return _rows(pixel_values=torch.randn(n, 3, 8, 8, generator=g, dtype=torch.float64),
                 labels=torch.randint(0, 3, (n,), generator=g))


def weighted_ce(outputs, labels, num_items_in_batch=None):
    """A user's `compute_loss_func`: class-weighted cross-entropy, summed over the accumulated batch."""
    return F.cross_entropy(outputs["logits"], labels, weight=CLASS_WEIGHTS, reduction="sum") / num_items_in_batch


class WeightedLossTrainer(ESAMTrainer):
    """A user's Trainer subclass overriding compute_loss: class-weighted mean cross-entropy, times 10."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        labels = inputs.pop("labels")
        outputs = model(**inputs)
        loss = 10 * F.cross_entropy(outputs.logits, labels, weight=CLASS_WEIGHTS)
        return (loss, outputs) if return_outputs else loss


def _llama_lora():
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    base = transformers.LlamaForCausalLM(_decoder_config(transformers.LlamaConfig)).double()
    return get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], lora_dropout=0.0,
                                           init_lora_weights=False, task_type="CAUSAL_LM"))


@dataclasses.dataclass
class Family:
    build: Callable[[], nn.Module]
    data: list[dict]
    trainer_cls: type = ESAMTrainer
    trainer_kwargs: dict = dataclasses.field(default_factory=dict)
    batch_size: int = 8
    accumulation: int = 1
    # The Trainer's loss on a batch, written independently of esam_hf; default: the model's own loss.
    reference_loss: Callable[[nn.Module, dict, Any, int], torch.Tensor] | None = None
    key: str = "input_ids"  # identifies the rows a forward pass saw


def _bert_seq(**kw):
    return _seeded(lambda: transformers.BertForSequenceClassification(_bert_config(**kw)))


FAMILIES = {
    "bert_single_label": Family(_bert_seq(num_labels=3), seq_cls_data()),
    "bert_multi_label": Family(_bert_seq(num_labels=3, problem_type="multi_label_classification"),
                               seq_cls_data(kind="multi")),
    "bert_regression": Family(_bert_seq(num_labels=1), seq_cls_data(kind="regression")),
    "bert_token_classification": Family(
        _seeded(lambda: transformers.BertForTokenClassification(_bert_config(num_labels=3))), token_cls_data()),
    "gpt2_padded_accumulation": Family(
        _seeded(lambda: transformers.GPT2LMHeadModel(transformers.GPT2Config(
            vocab_size=50, n_positions=32, n_embd=16, n_layer=1, n_head=2, resid_pdrop=0.0, embd_pdrop=0.0,
            attn_pdrop=0.0, bos_token_id=0, eos_token_id=0))), clm_data(48), batch_size=4, accumulation=2),
    "llama_lora": Family(_llama_lora, clm_data()),
    "bart": Family(_seeded(lambda: transformers.BartForConditionalGeneration(transformers.BartConfig(
        vocab_size=50, d_model=16, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
        decoder_attention_heads=2, encoder_ffn_dim=16, decoder_ffn_dim=16, max_position_embeddings=32, dropout=0.0,
        attention_dropout=0.0, activation_dropout=0.0, pad_token_id=0, bos_token_id=1, eos_token_id=2,
        decoder_start_token_id=2))), seq2seq_data()),
    "t5": Family(_seeded(lambda: transformers.T5ForConditionalGeneration(transformers.T5Config(
        vocab_size=50, d_model=16, d_kv=8, d_ff=16, num_layers=1, num_decoder_layers=1, num_heads=2,
        dropout_rate=0.0, pad_token_id=0, decoder_start_token_id=0, eos_token_id=1))), seq2seq_data()),
    "mixtral_router_aux_loss": Family(_seeded(lambda: transformers.MixtralForCausalLM(_decoder_config(
        transformers.MixtralConfig, num_local_experts=4, num_experts_per_tok=2, output_router_logits=True,
        router_aux_loss_coef=0.5, router_jitter_noise=0.0, experts_implementation="eager"))), clm_data()),
    "vit": Family(_seeded(lambda: transformers.ViTForImageClassification(transformers.ViTConfig(
        image_size=8, patch_size=4, num_channels=3, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=16, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, num_labels=3))),
        image_data(), key="pixel_values"),
    "subclass_weighted_compute_loss": Family(
        _bert_seq(num_labels=3), seq_cls_data(), trainer_cls=WeightedLossTrainer,
        reference_loss=lambda model, batch, items, ga: 10 * F.cross_entropy(
            model(**{k: v for k, v in batch.items() if k != "labels"}).logits, batch["labels"],
            weight=CLASS_WEIGHTS) / ga),
    "compute_loss_func": Family(
        _bert_seq(num_labels=3), seq_cls_data(), trainer_kwargs={"compute_loss_func": weighted_ce},
        reference_loss=lambda model, batch, items, ga: weighted_ce(
            model(**{k: v for k, v in batch.items() if k != "labels"}), batch["labels"], items)),
}


def own_trainer_loss(model, batch, num_items, accumulation):
    """The Trainer's loss for a model computing its own: normalised by the Trainer's label count when
    the model's forward takes loss kwargs, else a per-batch mean scaled for accumulation."""
    forward = inspect.signature(unwrap_model(model).forward).parameters.values()
    if num_items is not None and any(p.kind == inspect.Parameter.VAR_KEYWORD for p in forward):
        return model(**batch, num_items_in_batch=num_items).loss
    return model(**batch).loss / accumulation


def reference_loss(family):
    return family.reference_loss or own_trainer_loss


class Recording(SequentialMixin, ESAMTrainer):
    """Visits the data in order and records the label count the Trainer passes to each step."""

    def training_step(self, model, inputs, num_items_in_batch=None):
        self.items.append(num_items_in_batch)
        return super().training_step(model, inputs, num_items_in_batch)


def run_trainer(family, tmp_path, trainer_cls=None, steps=3, **esam):
    model = family.build()
    trainable = [p for p in model.parameters() if p.requires_grad]
    cls = trainer_cls or type("Recorded", (Recording, family.trainer_cls), {})
    args = make_args(tmp_path, per_device_train_batch_size=family.batch_size, max_steps=steps,
                     gradient_accumulation_steps=family.accumulation, **esam)
    trainer = cls(model=model, args=args, train_dataset=family.data,
                  optimizers=(torch.optim.SGD(trainable, lr=0.05, momentum=0.9), None), **family.trainer_kwargs)
    trainer.items = []
    trainer.train()
    return model, trainer


def collate(rows):
    return {k: torch.stack([r[k] for r in rows]) for k in rows[0]}


def micro_batches(family, steps):
    rows = iter(family.data)
    for _ in range(steps):
        yield [collate([next(rows) for _ in range(family.batch_size)]) for _ in range(family.accumulation)]


def hand_written_sam(family, items, rho, steps=3):
    """Two-pass SAM on the Trainer's loss: e = rho g/||g|| per micro-batch, gradient at w + e,
    restore, SGD-momentum step after the accumulated micro-batches."""
    model = family.build()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=0.05, momentum=0.9)
    loss_of = reference_loss(family)
    for step, batches in enumerate(micro_batches(family, steps)):
        for batch in batches:
            grads = torch.autograd.grad(loss_of(model, batch, items[step], family.accumulation), params,
                                        allow_unused=True)
            grads = [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)]
            norm = torch.sqrt(sum((g ** 2).sum() for g in grads))
            saved = [p.detach().clone() for p in params]
            with torch.no_grad():
                for p, g in zip(params, grads):
                    p.add_(rho * g / (norm + 1e-12))
            loss_of(model, batch, items[step], family.accumulation).backward()
            with torch.no_grad():
                for p, s in zip(params, saved):
                    p.copy_(s)
        optimizer.step()
        optimizer.zero_grad()
    return model


def assert_same_params(a, b, rtol=1e-9, atol=1e-12):
    for (name, x), y in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(x, y, rtol=rtol, atol=atol, msg=name)


def _items_per_step(trainer, family):
    return trainer.items[::family.accumulation]


@pytest.mark.parametrize("name", list(FAMILIES))
def test_sam_equals_hand_written_sam_on_the_trainers_loss(tmp_path, name):
    family = FAMILIES[name]
    model, trainer = run_trainer(family, tmp_path, esam_rho=0.1, esam_beta=1.0, esam_gamma=1.0)
    reference = hand_written_sam(family, _items_per_step(trainer, family), rho=0.1)
    assert_same_params(model, reference)
    assert any(not torch.equal(p, q) for p, q in zip(model.parameters(), family.build().parameters()))


@pytest.mark.parametrize("name", list(FAMILIES))
def test_sam_at_tiny_rho_continues_plain_trainer_training(tmp_path, name):
    family = FAMILIES[name]
    sam, _ = run_trainer(family, tmp_path / "sam", esam_rho=1e-9, esam_beta=1.0, esam_gamma=1.0)
    overrides = {"compute_loss": WeightedLossTrainer.compute_loss} if family.trainer_cls is WeightedLossTrainer else {}
    plain, _ = run_trainer(family, tmp_path / "plain", trainer_cls=type("Plain", (SequentialMixin, Trainer), overrides))
    assert_same_params(sam, plain, rtol=1e-6, atol=1e-9)


def test_the_references_see_what_is_checked():
    """The families would catch a dropped term: without the router aux loss, or the class weights,
    or with the loss averaged per sequence, the reference gradient changes."""
    mixtral = FAMILIES["mixtral_router_aux_loss"]
    model = mixtral.build()
    batch = collate(mixtral.data[:8])
    with_aux = torch.autograd.grad(model(**batch).loss, model.model.layers[0].mlp.gate.weight)[0]
    without = torch.autograd.grad(model(**batch, output_router_logits=False).loss, model.model.layers[0].mlp.gate.weight)[0]
    assert (with_aux - without).norm() > 0.1 * with_aux.norm()

    bert = FAMILIES["compute_loss_func"]
    model, batch = bert.build(), collate(bert.data[:8])
    weighted = reference_loss(bert)(model, batch, 8, 1)
    assert not torch.isclose(weighted, model(**batch).loss)

    gpt2 = FAMILIES["gpt2_padded_accumulation"]
    model, batch = gpt2.build(), collate(gpt2.data[:4])
    logits = model(**batch).logits[:, :-1]
    labels = batch["labels"][:, 1:]
    token = F.cross_entropy(logits.transpose(1, 2), labels, reduction="none")
    valid = labels != -100
    per_sequence = ((token * valid).sum(1) / valid.sum(1)).mean()
    assert not torch.isclose(per_sequence, token[valid].mean())


def example_loss(family, model, example):
    """One example's own loss, computed alone (router aux loss left out: it is not per example)."""
    extra = {"output_router_logits": False} if getattr(unwrap_model(model).config, "output_router_logits", False) else {}
    return model(**example, **extra).loss


@pytest.mark.parametrize("name", list(FAMILIES))
def test_sds_descends_on_the_k_examples_whose_loss_rises_most(tmp_path, name):
    family = dataclasses.replace(FAMILIES[name], accumulation=1, batch_size=8)
    rho, k = 0.5, 4
    seen = []

    def spy(module, args, kwargs):
        seen.append(kwargs[family.key].detach().clone())

    class Spy(Recording, family.trainer_cls):
        def _get_esam(self):
            if self.esam is None:
                unwrap_model(self.model).register_forward_pre_hook(spy, with_kwargs=True)
            return super()._get_esam()

    model, trainer = run_trainer(family, tmp_path, trainer_cls=Spy, steps=1, esam_rho=rho, esam_beta=1.0,
                                 esam_gamma=0.5, esam_selection="sharpness")
    assert [s.shape[0] for s in seen] == [8, 8, k]  # ascent, selection, descent

    # Independent reference: e from the gradient of the Trainer's loss on the whole batch, then each
    # example's own loss at w and at w + e, one example at a time.
    ref = family.build()
    params = [p for p in ref.parameters() if p.requires_grad]
    batch = collate(family.data[:8])
    grads = torch.autograd.grad(reference_loss(family)(ref, batch, trainer.items[0], 1), params, allow_unused=True)
    grads = [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)]
    norm = torch.sqrt(sum((g ** 2).sum() for g in grads))
    examples = [{key: value[i:i + 1] for key, value in batch.items()} for i in range(8)]
    with torch.no_grad():
        clean = torch.stack([example_loss(family, ref, ex) for ex in examples])
        for p, g in zip(params, grads):
            p.add_(rho * g / norm)
        perturbed = torch.stack([example_loss(family, ref, ex) for ex in examples])
    sharpness = perturbed - clean
    top = sharpness.topk(k + 1).values
    assert top[k - 1] - top[k] > 1e-9, "the k-th and (k+1)-th examples tie: choose other data"
    expected = set(sharpness.topk(k).indices.tolist())
    chosen = {next(i for i in range(8) if torch.equal(batch[family.key][i], row)) for row in seen[2]}
    assert chosen == expected


def _tiny_t5():
    from transformers import T5Config, T5ForConditionalGeneration

    torch.manual_seed(0)
    config = T5Config(vocab_size=40, d_model=16, d_kv=8, d_ff=32, num_layers=1, num_decoder_layers=1, num_heads=2,
                      decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
    return T5ForConditionalGeneration(config)


def _seq2seq_data(n=16):
    g = torch.Generator().manual_seed(0)
    x = torch.randint(2, 40, (n, 6), generator=g)
    return [{"input_ids": x[i], "attention_mask": torch.ones(6, dtype=torch.long), "labels": x[i, :4].flip(0)}
            for i in range(n)]


def test_esam_seq2seq_trainer_is_seq2seq_trainer_at_rho_0_and_generates_at_evaluation(tmp_path):
    from transformers import Seq2SeqTrainer, Seq2SeqTrainingArguments

    from esam_hf import ESAMSeq2SeqTrainer, ESAMSeq2SeqTrainingArguments, ESAMTrainer

    common = dict(per_device_train_batch_size=8, max_steps=2, learning_rate=0.01, report_to="none", use_cpu=True,
                  save_strategy="no", seed=0, predict_with_generate=True, generation_max_length=5,
                  per_device_eval_batch_size=8, disable_tqdm=True)
    ours, theirs = _tiny_t5(), _tiny_t5()
    data = _seq2seq_data()
    seen = {}

    def metrics(pred):
        seen["shape"] = tuple(pred.predictions.shape)
        return {"n": float(pred.predictions.shape[0])}

    trainer = ESAMSeq2SeqTrainer(model=ours, args=ESAMSeq2SeqTrainingArguments(str(tmp_path / "a"), esam_rho=0.0, **common),
                                 train_dataset=data, eval_dataset=data, compute_metrics=metrics)
    trainer.train()
    Seq2SeqTrainer(model=theirs, args=Seq2SeqTrainingArguments(str(tmp_path / "b"), **common), train_dataset=data).train()
    for (name, a), b in zip(ours.named_parameters(), theirs.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)
    trainer.evaluate()
    assert seen["shape"][0] == 16 and len(seen["shape"]) == 2  # generated token ids [N, T], not logits [N, T, V]
    # With ESAM on (SAM here), it trains.
    sam = ESAMSeq2SeqTrainer(model=_tiny_t5(), args=ESAMSeq2SeqTrainingArguments(
        str(tmp_path / "c"), esam_beta=1.0, esam_gamma=1.0, **common), train_dataset=data)
    sam.train()
    assert not torch.equal(sam.model.lm_head.weight, _tiny_t5().lm_head.weight)
    # predict_with_generate through the plain ESAMTrainer would silently not generate: refused.
    with pytest.raises(ValueError, match="use esam_hf.ESAMSeq2SeqTrainer"):
        ESAMTrainer(model=_tiny_t5(), args=ESAMSeq2SeqTrainingArguments(str(tmp_path / "d"), **common))


def test_sds_descent_on_token_level_losses_is_normalised_per_label_token_of_its_rows(tmp_path):
    """GPT-2 with padded (-100) labels: the descent on the k kept rows is their mean over their own label
    tokens, as the Trainer would normalise a batch of those rows (not the whole batch's token count)."""
    family = dataclasses.replace(FAMILIES["gpt2_padded_accumulation"], accumulation=1, batch_size=8)
    rho = 0.5
    seen = []

    class Spy(Recording, family.trainer_cls):
        def _get_esam(self):
            if self.esam is None:
                unwrap_model(self.model).register_forward_pre_hook(
                    lambda module, args, kwargs: seen.append(kwargs["input_ids"].detach().clone()), with_kwargs=True)
            return super()._get_esam()

    model, trainer = run_trainer(family, tmp_path, trainer_cls=Spy, steps=1, esam_rho=rho, esam_beta=1.0,
                                 esam_gamma=0.5, esam_selection="sharpness")
    batch = collate(family.data[:8])
    rows = [next(i for i in range(8) if torch.equal(batch["input_ids"][i], r)) for r in seen[2]]
    tokens = (batch["labels"][:, 1:] != -100).sum(1)
    assert tokens[rows].sum() * 8 != tokens.sum() * len(rows), "the kept rows' token share must differ from theirs"
    ref = family.build()
    params = [p for p in ref.parameters() if p.requires_grad]
    grads = torch.autograd.grad(reference_loss(family)(ref, batch, trainer.items[0], 1), params)
    norm = torch.sqrt(sum((g ** 2).sum() for g in grads))
    saved = [p.detach().clone() for p in params]
    with torch.no_grad():
        for p, g in zip(params, grads):
            p.add_(rho * g / (norm + 1e-12))
    kept = {k: v[rows] for k, v in batch.items()}
    # The Trainer's loss on a batch of the kept rows alone: normalised by their label tokens, counted as
    # the Trainer counts a batch's (its own function).
    ref(**kept, num_items_in_batch=trainer._get_num_items_in_batch([kept], "cpu")).loss.backward()
    with torch.no_grad():
        for p, s in zip(params, saved):
            p.copy_(s)
    optimizer = torch.optim.SGD(params, lr=0.05, momentum=0.9)
    optimizer.step()
    assert_same_params(model, ref)


def test_a_subclass_that_declares_its_loss_scaled_for_accumulation_is_believed(tmp_path):
    """`loss_is_scaled_for_ga` decides, whatever the model accepts: a loss the subclass divided by the
    accumulation steps itself (True) and the same loss left for the trainer to divide (False) train alike."""
    family = dataclasses.replace(FAMILIES["bert_single_label"], batch_size=4, accumulation=2)

    class Declared(Recording):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            outputs = model(**inputs)  # BERT's mean over the micro-batch; num_items_in_batch is not used
            loss = outputs.loss / self.args.gradient_accumulation_steps if self.loss_is_scaled_for_ga else outputs.loss
            return (loss, outputs) if return_outputs else loss

    scaled = type("Scaled", (Declared,), {"loss_is_scaled_for_ga": True})
    unscaled = type("Unscaled", (Declared,), {"loss_is_scaled_for_ga": False})
    a, _ = run_trainer(family, tmp_path / "a", trainer_cls=scaled, steps=2, esam_rho=0.1, esam_beta=1.0, esam_gamma=1.0)
    b, _ = run_trainer(family, tmp_path / "b", trainer_cls=unscaled, steps=2, esam_rho=0.1, esam_beta=1.0,
                       esam_gamma=1.0)
    assert_same_params(a, b)
    assert any(not torch.equal(p, q) for p, q in zip(a.parameters(), family.build().parameters()))


def test_question_answering_with_accumulation_trains_as_hand_written_sam(tmp_path):
    """A model that takes loss kwargs but whose batches have no `labels` (start/end positions instead), with
    gradient accumulation: the Trainer counts no label tokens, so each micro-batch's mean loss is divided
    by the accumulation steps, in both ESAM passes."""
    ids, mask, g = _tokens(32, 0)
    data = _rows(input_ids=ids, attention_mask=mask, start_positions=torch.randint(0, T, (32,), generator=g),
                 end_positions=torch.randint(0, T, (32,), generator=g))
    qa = Family(_seeded(lambda: transformers.BertForQuestionAnswering(_bert_config())), data, batch_size=4,
                accumulation=2)
    model, trainer = run_trainer(qa, tmp_path, esam_rho=0.1, esam_beta=1.0, esam_gamma=1.0)
    assert trainer.items and all(i is None for i in trainer.items)
    reference = hand_written_sam(qa, _items_per_step(trainer, qa), rho=0.1)
    assert_same_params(model, reference)
    # SDS cannot show this loss is a mean of per-example losses it can compute: refused before any update.
    with pytest.raises(ValueError, match="esam_gamma=1 keeps the objective"):
        run_trainer(qa, tmp_path / "sds", esam_rho=0.1, esam_selection="random")
