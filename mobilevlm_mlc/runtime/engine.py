"""The Python driver: runs a compiled MobileVLM library on its dist folder.

`Engine` owns the VM, the weights and one paged KV cache; each `ChatSession` (`chat`) is a sequence in
that cache, so a multi-turn chat feeds only its new tokens. Like MLC's `debug_chat.py`, it calls the
library's functions as MLC's C++ engine does (`cpp/serve/model.cc`), here or on an RPC device (`backend`):
raw image bytes to `image_embed`, every prompt assembled in `alloc_embedding_tensor`'s buffer, `prefill`
/ `decode` for one sequence and `batch_prefill` / `batch_decode` for several (`Engine.generate_batch`:
one call per token for all live sequences), and each token drawn from `softmax_with_temperature` after
the library's logit processors (penalties, logit bias).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import tvm
from PIL import Image
from tvm import relax

from mobilevlm_mlc.errors import MobileVLMError, first_line
from mobilevlm_mlc.formats.dist import TOKENIZER_MODEL, load_dist
from mobilevlm_mlc.formats.library import check_shared_library, inspect_library
from mobilevlm_mlc.formats.manifest import check_library
from mobilevlm_mlc.formats.tensor_cache import load_tensor_cache

from .backend import Backend, LocalBackend, RemoteSession, parse_device
from .chat import ChatSession, TurnResult, run_turns
from .conversation import IMAGE_TOKEN_ID
from .kv_cache import PagedKVCache
from .preprocess import image_bytes, load_image
from .sampling import GenerationConfig, Sampler
from .tokenizer import Tokenizer


class Engine:
    def __init__(
        self,
        dist_dir: Path,
        lib_path: Path,
        device: str = "cpu",
        max_sequences: int = 4,
        kv_cache_tokens: int | None = None,
        remote: RemoteSession | None = None,
        context_window_size: int | None = None,
    ):
        """`kv_cache_tokens` bounds the tokens of all live sequences together (default: one context window).
        `context_window_size` caps one conversation below the library's window (less memory, earlier
        dropping of old turns). With `remote`, the library runs on that RPC device (uploaded there;
        weights copied over). The library must have been compiled from this dist (its manifest)."""
        self.dist = load_dist(dist_dir)
        self.backend: Backend = remote or LocalBackend()
        lib_path = Path(lib_path)
        self.lib_path = lib_path
        self._check_library_file(lib_path, device)
        self._entries: dict[str, object] = {}
        self.device = self.backend.device(device)
        try:
            self.vm = relax.VirtualMachine(self.backend.load_library(lib_path), self.device)
            self.metadata = json.loads(self._entry("_metadata")())
        except Exception as err:  # noqa: BLE001 - any loader failure means an unusable file
            raise MobileVLMError(
                f"{lib_path}: not a loadable mobilevlm-mlc library ({first_line(err)}); "
                "compile it again with this mobilevlm-mlc and TVM"
            ) from None
        check_library(self.dist, lib_path, self.metadata)
        library_window = int(self.metadata["context_window_size"])
        if context_window_size is not None and not 0 < context_window_size <= library_window:
            raise MobileVLMError(
                f"context_window_size is {context_window_size}, expected 1..{library_window} (the library's)"
            )
        self.context_window_size = context_window_size or library_window
        self._param_tensors = self._load_params()  # alive as long as the array (over RPC: remote handles)
        self.params = self.backend.param_array(self._param_tensors)
        self.tokenizer = Tokenizer(self.dist.path / TOKENIZER_MODEL)
        self.prefill_chunk_size = int(self.metadata["prefill_chunk_size"])
        self.vocab_size = int(self.metadata["vocab_size"])
        # prompts are assembled in the library's own buffer, whose shape gives the hidden size (as in MLC)
        self.embedding_buffer = self._entry("alloc_embedding_tensor")()
        self.hidden_size = int(self.embedding_buffer.shape[1])
        self._embedding_bytes = tvm.runtime.DataType(str(self.embedding_buffer.dtype)).bits // 8
        # the library's quantized matmuls round activations to int8 (its build record, `targets/cpu.py`)
        self.int8_activations = self.metadata["build"].get("quantized_matmul_activations") == "int8"
        self.max_sequences = max_sequences
        self.kv = PagedKVCache(
            self._entry("create_tir_paged_kv_cache"),
            self.backend,
            max_sequences,
            kv_cache_tokens or self.context_window_size,
            self.prefill_chunk_size,
        )
        self.stop_token_ids = set(self.dist.chat_config["conv_template"]["stop_token_ids"])

    def _check_library_file(self, lib_path: Path, device: str) -> None:
        """Refuse, before loading, a file that is no whole library for this machine or holds no code for `device`."""
        if not lib_path.is_file():
            raise MobileVLMError(f"{lib_path}: compiled library not found (build it with `mobilevlm-mlc compile`)")
        check_shared_library(lib_path, self.backend.machine)
        report = inspect_library(lib_path)
        if report.contract_problems:  # this driver calls the library as MLC's engine does
            more = f" (and {len(report.contract_problems) - 1} more)" if len(report.contract_problems) > 1 else ""
            raise MobileVLMError(
                f"{lib_path}: lacks what MLC's engine and this driver call: {report.contract_problems[0]}{more}; "
                "compile it again with this mobilevlm-mlc"
            )
        device_code = {module.kind for module in report.device_modules}
        kind = parse_device(device)[0]
        if device_code and kind not in device_code or not device_code and kind != "cpu":
            holds = f"{', '.join(sorted(device_code))} device code" if device_code else "CPU code only"
            raise MobileVLMError(
                f"{lib_path}: holds {holds}, but the device is {device!r}; run it with the matching "
                "--device (on a machine that has it), or compile for that device's target"
            )

    def _entry(self, name: str):
        """An entry point of the library, looked up once (over RPC each lookup is a round trip)."""
        if name not in self._entries:
            self._entries[name] = self.vm[name]
        return self._entries[name]

    def _function(self, name: str):
        """A TIR function of the library (the logit processors), looked up as MLC's engine does."""
        key = f"tir:{name}"
        if key not in self._entries:
            self._entries[key] = self.vm.module.get_function(name, query_imports=True)
        return self._entries[key]

    def _load_params(self) -> list[tvm.runtime.Tensor]:
        """The weights in the library's parameter order, refused unless names, shapes and dtypes all match."""
        loaded = load_tensor_cache(self.dist.path, self.device, self.backend.weight_placement(self.device))
        problems, params = [], []
        if self.metadata["quantization"] != self.dist.quantization.name:
            problems.append(
                f"library built for {self.metadata['quantization']}, weights are {self.dist.quantization.name}"
            )
        for spec in self.metadata["params"]:
            name = spec["name"]
            tensor = loaded.get(name)
            if tensor is None:
                problems.append(f"{name} missing")
            elif list(tensor.shape) != spec["shape"] or str(tensor.dtype) != spec["dtype"]:
                problems.append(
                    f"{name} is {list(tensor.shape)} {tensor.dtype}, library expects {spec['shape']} {spec['dtype']}"
                )
            params.append(tensor)
        if problems:
            more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
            raise MobileVLMError(f"{self.dist.path}: weights do not match the library: {'; '.join(problems[:3])}{more}")
        return params

    # ---- model boundaries -------------------------------------------------------------------------

    def pixels(self, image: Image.Image | Path | str) -> np.ndarray:
        """The image's RGB bytes [1, H, W, 3], what MLC's engine passes to `image_embed` (the library
        pads, resizes and normalizes)."""
        return image_bytes(image if isinstance(image, Image.Image) else load_image(Path(image)))

    def preprocess_image(self, pixels: np.ndarray) -> np.ndarray:
        """The library's preprocessing alone: the pixels entering CLIP, float32 [1, 3, S, S]."""
        return self._entry("preprocess_image")(tvm.runtime.tensor(pixels, self.device), self.params).numpy()

    def vision_features(self, pixels: np.ndarray) -> np.ndarray:
        return self._entry("vision_features")(tvm.runtime.tensor(pixels, self.device), self.params).numpy()

    def image_embed(self, pixels: np.ndarray) -> tvm.runtime.Tensor:
        """Image tokens [image_tokens, hidden] on the device, called as MLC's engine calls it: the bytes,
        then four sizes that are 0 for every model but Phi-3-V."""
        sizes = [self.backend.shape(0)] * 4
        return self._entry("image_embed")(tvm.runtime.tensor(pixels, self.device), *sizes, self.params)

    def embed(self, ids: list[int]) -> tvm.runtime.Tensor:
        """Token embeddings [len(ids), hidden] on the device."""
        ids_array = np.asarray(ids, np.int32)
        if ids_array.size and (
            ids_array.min() < 0 or ids_array.max() >= self.vocab_size
        ):  # the gather does no bounds check
            raise MobileVLMError(
                f"token ids must lie in [0, {self.vocab_size}), found {ids_array.min()}..{ids_array.max()}"
            )
        return self._entry("embed")(tvm.runtime.tensor(ids_array, self.device), self.params)

    def prompt(self, ids: list[int], images: list[tvm.runtime.Tensor]) -> list[tvm.runtime.Tensor]:
        """A prompt's parts on the device, in order: the embeddings of each run of text, and in place of
        each `IMAGE_TOKEN_ID` the next image's tokens (`image_embed`)."""
        positions = [i for i, t in enumerate(ids) if t == IMAGE_TOKEN_ID]
        if len(positions) != len(images):
            raise MobileVLMError(
                f"the prompt has {len(positions)} <image> placeholder(s) but {len(images)} image(s) were given"
            )
        parts, start = [], 0
        for pos, image in zip(positions + [len(ids)], images + [None]):
            if pos > start:
                parts.append(self.embed(ids[start:pos]))
            if image is not None:
                parts.append(image)
            start = pos + 1
        return parts

    # ---- sequences in the KV cache -----------------------------------------------------------------

    def free_kv_tokens(self) -> int:
        return self.kv.free_tokens()

    def add_sequence(self) -> int:
        return self.kv.add_sequence()

    def remove_sequence(self, seq_id: int) -> None:
        self.kv.remove_sequence(seq_id)

    def fork_sequence(self, parent: int, position: int) -> int:
        return self.kv.fork_sequence(parent, position)

    def release_workspace(self) -> None:
        """Free the VM's pooled buffers that are not in use. The pooled allocator keeps a buffer for every
        size it ever served, so each long prefill of a new length (a re-prefilled chat history) would
        otherwise stay resident for good."""
        self.backend.builtin("memory_manager.clear")()

    # ---- forward passes, as MLC's engine makes them ------------------------------------------------

    def _place(self, parts: list[tvm.runtime.Tensor], start: int, stop: int, row: int) -> None:
        """Rows `start:stop` of the prompt made of `parts` into the embedding buffer from `row` on: views
        and device copies, which TVM's own RPC server runs too (MLC's engine uses its
        `copy_embedding_to_offset`, a function of MLC's runtime)."""
        first = 0
        for part in parts:
            rows = int(part.shape[0])
            lo, hi = max(start, first), min(stop, first + rows)
            if lo < hi:
                source = part if hi - lo == rows else self._rows(part, lo - first, hi - lo)
                self._rows(self.embedding_buffer, row + lo - start, hi - lo).copyfrom(source)
            first += rows

    def _rows(self, tensor: tvm.runtime.Tensor, first: int, count: int) -> tvm.runtime.Tensor:
        """Rows `first:first+count` of a [n, hidden] device tensor, as a view."""
        offset = first * self.hidden_size * self._embedding_bytes
        return self.backend.view(tensor, (count, self.hidden_size), offset)

    def prefill(self, seq_ids: list[int], prompts: list[list[tvm.runtime.Tensor]]) -> list[tvm.runtime.Tensor]:
        """Feed each prompt (its `prompt` parts) to its sequence; each sequence's logits after its last
        token, [1, 1, vocab] float32 on the device. The prompts are packed into `alloc_embedding_tensor`'s
        buffer, `prefill_chunk_size` rows per call: `prefill` when a call holds one sequence,
        `batch_prefill` (logits at each sequence's last row) when it holds several."""
        lengths = [sum(int(part.shape[0]) for part in parts) for parts in prompts]
        fed, last = [0] * len(prompts), [None] * len(prompts)
        waiting = [i for i, n in enumerate(lengths) if n]
        while waiting:
            members, counts, row = [], [], 0
            for i in waiting:
                take = min(lengths[i] - fed[i], self.prefill_chunk_size - row)
                if take == 0:
                    break
                self._place(prompts[i], fed[i], fed[i] + take, row)
                members, counts, row = members + [i], counts + [take], row + take
            embeds = self.backend.view(self.embedding_buffer, (1, row, self.hidden_size), 0)
            self.kv.begin_forward([seq_ids[i] for i in members], counts)
            if len(members) == 1:
                result = self._entry("prefill")(embeds, self.kv.handle, self.params)
            else:
                positions = tvm.runtime.tensor(np.cumsum(counts).astype(np.int32) - 1, self.device)
                result = self._entry("batch_prefill")(embeds, positions, self.kv.handle, self.params)
            logits, self.kv.handle = self.backend.pair(result)
            self.kv.end_forward()
            for k, i in enumerate(members):
                fed[i] += counts[k]
                if fed[i] == lengths[i]:
                    last[i] = logits if len(members) == 1 else self._logit_row(logits, k)
            waiting = [i for i in waiting if fed[i] < lengths[i]]
        return last

    def _logit_row(self, logits: tvm.runtime.Tensor, index: int) -> tvm.runtime.Tensor:
        """Row `index` of logits [1, b, vocab] as a tensor of its own (kernels take no offset views)."""
        row = tvm.runtime.empty((1, 1, self.vocab_size), "float32", self.device)
        row.copyfrom(self.backend.view(logits, (1, 1, self.vocab_size), index * self.vocab_size * 4))
        return row

    def decode(self, seq_ids: list[int], tokens: list[int]) -> tvm.runtime.Tensor:
        """One token for each sequence: logits [len(seq_ids), 1, vocab] float32 on the device. `decode`
        for one sequence; `batch_decode` for several (one call: each weight read once for the batch)."""
        embeds = self.embed(tokens)
        batch = len(seq_ids)
        self.kv.begin_forward(seq_ids, [1] * batch)
        if batch == 1:
            embeds = self.backend.builtin("reshape")(embeds, self.backend.shape(1, 1, self.hidden_size))
            result = self._entry("decode")(embeds, self.kv.handle, self.params)
        else:
            embeds = self.backend.builtin("reshape")(embeds, self.backend.shape(batch, 1, self.hidden_size))
            result = self._entry("batch_decode")(embeds, self.kv.handle, self.params)
        logits, self.kv.handle = self.backend.pair(result)
        self.kv.end_forward()
        return logits

    # ---- sampling, as MLC's engine does it -----------------------------------------------------------

    def check_generation(self, config: GenerationConfig) -> None:
        """What only the model can check of a request: its logit bias names tokens of the vocabulary."""
        outside = sorted(t for t in config.logit_bias if t >= self.vocab_size)
        if outside:
            raise MobileVLMError(f"logit_bias: token id {outside[0]} is outside the vocabulary [0, {self.vocab_size})")

    def sample(self, logits: tvm.runtime.Tensor, samplers: list[Sampler]) -> list[int]:
        """The next token of each row of `logits` [b, 1, vocab] (device), as MLC's engine makes it: the
        library's `apply_logit_bias_inplace` and `apply_penalty_inplace` on the logits, then its
        `softmax_with_temperature`; top-k / top-p and the draw on the host, per sequence."""
        rows = self.backend.builtin("reshape")(logits, self.backend.shape(len(samplers), self.vocab_size))
        biased = [(k, t, b) for k, s in enumerate(samplers) for t, b in s.config.logit_bias.items()]
        if biased:
            pos2seq, tokens, bias = zip(*biased)
            self._function("apply_logit_bias_inplace")(
                rows, self._int32(pos2seq), self._int32(tokens), self._float32(bias)
            )
        penalized = [(k, s) for k, s in enumerate(samplers) if s.config.penalizes and s.counts]
        if penalized:
            counted = [(j, t, n) for j, (_, s) in enumerate(penalized) for t, n in s.counts.items()]
            pos2seq, tokens, counts = zip(*counted)
            penalties = [
                [s.config.presence_penalty, s.config.frequency_penalty, s.config.repetition_penalty]
                for _, s in penalized
            ]
            self._function("apply_penalty_inplace")(
                rows,
                self._int32([k for k, _ in penalized]),
                self._int32(pos2seq),
                self._int32(tokens),
                self._int32(counts),
                self._float32(penalties),
            )
        temperature = self._float32([s.config.temperature for s in samplers])
        probs = self._entry("softmax_with_temperature")(logits, temperature).numpy()[:, 0]
        return [sampler(probs[k]) for k, sampler in enumerate(samplers)]

    def _int32(self, values) -> tvm.runtime.Tensor:
        return tvm.runtime.tensor(np.asarray(values, np.int32), self.device)

    def _float32(self, values) -> tvm.runtime.Tensor:
        return tvm.runtime.tensor(np.asarray(values, np.float32), self.device)

    # ---- whole requests ------------------------------------------------------------------------------

    def teacher_forced_logits(self, ids: list[int], images: list[tvm.runtime.Tensor], tokens: list[int]) -> np.ndarray:
        """float32 logits [len(tokens), vocab]: after the prompt `ids`, then after each of `tokens[:-1]` (decode steps)."""
        seq_id = self.add_sequence()
        try:
            steps = [self.prefill([seq_id], [self.prompt(ids, images)])[0].numpy()[0, -1]]
            steps += [self.decode([seq_id], [token]).numpy()[0, -1] for token in tokens[:-1]]
        finally:
            self.remove_sequence(seq_id)
        return np.stack(steps)

    def chat(self) -> ChatSession:
        return ChatSession(self)

    def generate_batch(
        self,
        prompts: list[str],
        images: list[Image.Image | Path | str | None] | None = None,
        config: GenerationConfig | None = None,
    ) -> list[TurnResult]:
        """Answer several prompts together, one sequence each in the shared paged KV cache: prefilled
        together (`batch_prefill`), then every live sequence decoded in one `batch_decode` call per
        token. Each answer is what its prompt gives alone."""
        images = images if images is not None else [None] * len(prompts)
        if len(images) != len(prompts):
            raise MobileVLMError(
                f"generate_batch got {len(prompts)} prompts but {len(images)} images (use None for none)"
            )
        sessions: list[ChatSession] = []
        try:
            for _ in prompts:
                sessions.append(self.chat())
            run_turns(self, [(s, p, im, config) for s, p, im in zip(sessions, prompts, images)])
            return [s.last for s in sessions]
        finally:
            for session in sessions:
                session.close()
