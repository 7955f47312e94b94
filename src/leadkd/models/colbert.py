"""ColBERT (late interaction) as a LEAD model: per-layer MaxSim over token states.

Inputs follow the LEAD paper's code (spec §2.2): the query's [CLS] is replaced by a query marker and
the query is padded with *attended* [MASK] tokens to a fixed length (ColBERT's query augmentation);
the passage's [CLS] is replaced by a document marker and padded with [PAD], which is masked out.

The score is ColBERT's: the last block's token states through a bias-free linear projection to ``dim``
and L2 normalisation (``dim=None`` skips the projection and only normalises, which is what the paper's
code does). Intermediate layers are scored on their raw token states, as in the paper. ``layer_scores``
gives the last layer as that final score; LEAD's layer loss instead scores the last layer raw like every
other (``raw_last``, what the paper's code does), and only the response term uses the final vectors.
Truncation to the maximum lengths keeps the closing [SEP] (the paper's code could cut it off a long
query).

Checkpoints of other ColBERT libraries open with their own conventions, read from the folder
(:mod:`~leadkd.models.colbert_formats`: PyLate, ColBERTv2): the marker inserted after [CLS] rather than
replacing it (``marker_position``), [MASK] expansion seen by the query tokens or not (``attend_expansion``),
no expansion at all (``query_expansion``), and token ids dropped from the passage side of MaxSim
(``skiplist``, e.g. punctuation). Their trained bias-free projection becomes ``projection``; saving writes
leadkd's format, which reopens with the same scores.

The padding mask of the passages is returned *with* their states and MaxSim takes it as an argument,
so a trainer that gathers states across processes gathers the masks too (the fix for spec §7.4-1,
where the local mask was applied to gathered states).
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import torch
import torch.nn.functional as F
from torch import nn

from ..runtime import distributed as dist
from ..runtime.errors import ConfigError, LeadkdError
from ..runtime.fileio import atomic_directory
from .base import (
    block_outputs,
    check_overrides,
    freeze_pooler,
    load_backbone,
    loading_options,
    num_blocks,
    options_from_folder,
    position_limit,
    read_leadkd_config,
    resolve_layers,
    resolve_model_path,
)
from .batch_inputs import ColBERTTokenizer, inputs_to
from .colbert_formats import read_foreign, skiplist_ids
from .loading import write_leadkd_config

if TYPE_CHECKING:
    from transformers import PreTrainedModel

logger = logging.getLogger(__name__)

KIND = "colbert"
#: Projection weights saved beside the backbone (key ``weight``, shape ``[dim, hidden]``).
PROJECTION_FILE = "colbert_projection.safetensors"
#: Seed of the projection's initialisation when a folder has none (a plain HF checkpoint), so two
#: runs that start from the same backbone start from the same ColBERT.
PROJECTION_SEED = 0
#: Upper bound on the elements of one query-by-passage similarity block inside :func:`maxsim_scores`.
MAXSIM_BLOCK_ELEMENTS = 1 << 25
#: Where the query/document marker goes: in place of [CLS] (the LEAD paper's code) or right after it.
MARKER_REPLACES_CLS = "replace_cls"
MARKER_AFTER_CLS = "after_cls"
MARKER_POSITIONS = (MARKER_REPLACES_CLS, MARKER_AFTER_CLS)


@dataclass(frozen=True)
class ColBERTOptions:
    """What a ColBERT folder remembers in ``leadkd_config.json`` besides its weights."""

    dim: int | None = 128
    query_marker: str = "[unused1]"
    doc_marker: str = "[unused2]"
    max_query_length: int = 32
    max_passage_length: int = 256
    #: ``"replace_cls"``: the marker takes [CLS]'s place (the paper's code); ``"after_cls"``: it is inserted
    #: right after [CLS] (ColBERTv2, PyLate).
    marker_position: str = MARKER_REPLACES_CLS
    #: Whether the real query tokens attend to the [MASK] expansion (the paper's code: yes; ColBERTv2 and
    #: PyLate by default: no, the [MASK]s attend to the query but not back). Either way they are scored.
    attend_expansion: bool = True
    #: Pad queries with [MASK] to ``max_query_length`` (query augmentation); off (PyLate's
    #: ``do_query_expansion: false``), queries are padded with [PAD] and the padding is not scored.
    query_expansion: bool = True
    #: Token ids dropped from the passage side of MaxSim (still encoded): ColBERTv2's punctuation mask,
    #: PyLate's skiplist. Applies to every layer, so raw and final scores see the same passage tokens.
    skiplist: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if self.marker_position not in MARKER_POSITIONS:
            raise ConfigError(f"ColBERT marker_position must be one of {', '.join(MARKER_POSITIONS)}, "
                              f"got {self.marker_position!r}")
        for name in ("attend_expansion", "query_expansion"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"ColBERT {name} must be true or false, got {getattr(self, name)!r}")
        skiplist = self.skiplist
        if isinstance(skiplist, (str, bytes)) or not hasattr(skiplist, "__iter__") or not all(
                isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in skiplist):
            raise ConfigError(f"ColBERT skiplist must be a list of token ids, got {skiplist!r}")
        object.__setattr__(self, "skiplist", tuple(sorted(set(skiplist))))
        if self.marker_position == MARKER_AFTER_CLS:
            for name in ("max_query_length", "max_passage_length"):
                if getattr(self, name) < 3:
                    raise ConfigError(f"ColBERT {name} must be >= 3 with the marker after [CLS], "
                                      f"got {getattr(self, name)}")
        if self.dim is not None and (isinstance(self.dim, bool) or not isinstance(self.dim, int) or self.dim < 1):
            raise ConfigError(f"ColBERT dim must be a positive integer or null, got {self.dim!r}")
        for name in ("max_query_length", "max_passage_length"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 2:
                raise ConfigError(f"ColBERT {name} must be an integer >= 2 (marker and [SEP]), got {value!r}")
        for name in ("query_marker", "doc_marker"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name):
                raise ConfigError(f"ColBERT {name} must be a non-empty token string")


#: The paper's input format; :meth:`ColBERT.settings` stores the format options only where they differ.
DEFAULT_OPTIONS = ColBERTOptions()
FORMAT_OPTIONS = ("marker_position", "attend_expansion", "query_expansion", "skiplist")


def maxsim_scores(q_states: torch.Tensor, p_states: torch.Tensor, p_mask: torch.Tensor,
                  chunk_size: int | None = None) -> torch.Tensor:
    """Late-interaction scores of every query against every passage: ``[Q, P]``.

    score(q, p) = sum over *all* query positions of the max inner product over p's non-padding tokens.
    Padding is filled with a large negative number before the max, scaled by the query length so that
    even a passage with no real token (a pure-padding row) sums to a finite value below any real score.
    Passages are processed ``chunk_size`` at a time (default: a block of about 2**25 similarities), so
    memory stays bounded; the max keeps only its indices for backward, so autograd does not hold the
    full similarity tensor either.
    """
    if q_states.dim() != 3 or p_states.dim() != 3 or p_mask.dim() != 2:
        raise ValueError("maxsim_scores expects q_states [Q,Tq,d], p_states [P,Tp,d] and p_mask [P,Tp]")
    if q_states.shape[-1] != p_states.shape[-1] or p_mask.shape != p_states.shape[:2]:
        raise ValueError(f"shape mismatch: q_states {tuple(q_states.shape)}, p_states {tuple(p_states.shape)}, "
                         f"p_mask {tuple(p_mask.shape)}")
    num_q, q_len, _ = q_states.shape
    num_p, p_len, _ = p_states.shape
    fill = torch.finfo(q_states.dtype).min / (2 * max(q_len, 1))
    if num_p == 0 or p_len == 0:
        return q_states.new_full((num_q, num_p), fill * q_len)
    if chunk_size is None:
        chunk_size = max(1, MAXSIM_BLOCK_ELEMENTS // max(1, num_q * q_len * p_len))
    padding = ~p_mask.to(device=p_states.device, dtype=torch.bool)
    blocks = []
    for start in range(0, num_p, chunk_size):
        sim = torch.einsum("qid,pjd->qpij", q_states, p_states[start:start + chunk_size])
        sim = sim.masked_fill(padding[start:start + chunk_size][None, :, None, :], fill)
        blocks.append(sim.max(dim=-1).values.sum(dim=-1))
    return torch.cat(blocks, dim=1)


@dataclass
class TokenBatch:
    """ColBERT's view of a batch: token states per layer (a list: the final vectors' width is ``dim``, the
    others' the hidden size) and the passages' padding mask, which travels with their states."""

    queries: list[torch.Tensor]         # [Q, Tq, d_l] per layer
    passages: list[torch.Tensor]        # [P, Tp, d_l] per layer
    passage_mask: torch.Tensor          # [P, Tp]

    def gathered(self, with_grad: bool) -> TokenBatch:
        """Sequence lengths differ per process, so states are padded to the longest before gathering, and
        the mask goes with them (the paper's code gathered states but kept the local mask: spec §7.4-1)."""
        mask = dist.gather_padded(self.passage_mask.unsqueeze(-1).float(), pad_value=0.0, dim=1).squeeze(-1) > 0
        states = [dist.gather_padded(s if with_grad else s.detach(), pad_value=0.0, dim=1) for s in self.passages]
        return TokenBatch(self.queries, states, mask)

    def scores(self) -> torch.Tensor:
        return torch.stack([maxsim_scores(q, p, self.passage_mask)
                            for q, p in zip(self.queries, self.passages, strict=True)])


def _token_id(tokenizer, token: str | None, message: str) -> int:
    """The id of a token the input format needs, or a one-line error saying which one is missing."""
    if not token or token not in tokenizer.get_vocab():
        raise LeadkdError(message)
    return tokenizer.convert_tokens_to_ids(token)


class ColBERT(nn.Module):
    """A ColBERT over any Hugging Face encoder, exposing every layer's MaxSim scores.

    Built with :meth:`from_pretrained`; ``from_pretrained`` returns it in eval mode (as Hugging Face
    does); call ``.train()`` to train it. Calling the module is ``layer_scores`` (so DDP can wrap it).
    """

    kind = KIND
    scores_whole_batch = True
    skip_ids: torch.Tensor  # a buffer (registered in __init__), which nn.Module's attribute typing does not know

    def __init__(self, tokenizer, backbone: PreTrainedModel, options: ColBERTOptions = ColBERTOptions(),
                 projection: nn.Linear | None = None):
        super().__init__()
        self.tokenizer = tokenizer
        self.backbone = backbone
        self.options = options
        self.num_layers = num_blocks(backbone)
        freeze_pooler(backbone)
        hidden = backbone.config.hidden_size
        if options.dim is None:
            if projection is not None:
                raise ConfigError("ColBERT got a projection but dim is null")
        elif projection is None:
            projection = _seeded_projection(hidden, options.dim)
        elif tuple(projection.weight.shape) != (options.dim, hidden):
            raise ConfigError(f"ColBERT projection has shape {tuple(projection.weight.shape)}, "
                              f"expected [dim={options.dim}, hidden={hidden}]")
        self.projection = projection
        # Once here, not per passage batch; not persistent, so saved weights stay what they were.
        self.register_buffer("skip_ids", torch.tensor(options.skiplist, dtype=torch.long), persistent=False)
        missing = "ColBERT {} {!r} is not in the tokenizer's vocabulary; pass {}=... naming a token that is"
        self.query_marker_id = _token_id(tokenizer, options.query_marker,
                                         missing.format("query_marker", options.query_marker, "query_marker"))
        self.doc_marker_id = _token_id(tokenizer, options.doc_marker,
                                       missing.format("doc_marker", options.doc_marker, "doc_marker"))
        self.mask_id = _token_id(tokenizer, tokenizer.mask_token,
                                 "ColBERT pads queries with the mask token, but the tokenizer has none")
        self.pad_id = _token_id(tokenizer, tokenizer.pad_token, "ColBERT needs a tokenizer with a padding token")
        if tokenizer.cls_token_id is None:
            raise LeadkdError("ColBERT needs a tokenizer that starts sequences with a [CLS]-like token")
        limit = position_limit(tokenizer, backbone)
        self.query_length = self._fit_length(options.max_query_length, limit, "max_query_length")
        self.passage_length = self._fit_length(options.max_passage_length, limit, "max_passage_length")

    @staticmethod
    def _fit_length(wanted: int, limit: int | None, name: str) -> int:
        if limit is not None and wanted > limit:
            logger.warning("ColBERT %s=%d exceeds the model's %d positions; using %d", name, wanted, limit, limit)
            return limit
        return wanted

    # ------------------------------------------------------------------ loading and saving
    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, *, trust_remote_code: bool = False, allow_partial: bool = False,
                        use_safetensors: bool = True, **overrides) -> ColBERT:
        """Load a leadkd ColBERT folder, a PyLate or ColBERTv2 checkpoint, or start one from any HF encoder.

        ``overrides`` are :class:`ColBERTOptions` fields (``dim``, ``query_marker``, ``doc_marker``,
        ``max_query_length``, ``max_passage_length``, ``marker_position``, ``attend_expansion``,
        ``query_expansion``, ``skiplist``); given ones win over the folder's saved options, which win over
        the defaults. A PyLate or ColBERTv2 folder (see :mod:`~leadkd.models.colbert_formats`) gives its own
        settings and trained projection instead of the defaults. A folder without
        ``colbert_projection.safetensors`` (and of neither format) gets a fresh projection, initialised as
        ``nn.Linear`` does but from seed :data:`PROJECTION_SEED`; a saved ColBERT with a projection that lost
        the file is refused unless ``allow_partial``. The backbone loads strictly (see
        :func:`~leadkd.models.base.load_backbone` for ``allow_partial`` and ``use_safetensors``).
        """
        location = resolve_model_path(path)
        foreign = read_foreign(location, use_safetensors) if os.path.isdir(location) else None
        if foreign is not None:
            return cls._from_foreign(foreign, overrides, trust_remote_code=trust_remote_code,
                                     allow_partial=allow_partial, use_safetensors=use_safetensors)
        options = options_from_folder(location, KIND, ColBERTOptions, overrides)
        tokenizer, backbone = load_backbone(location, trust_remote_code=trust_remote_code,
                                            allow_partial=allow_partial, use_safetensors=use_safetensors)
        projection = None
        file = Path(location) / PROJECTION_FILE
        if options.dim is not None and file.is_file():
            projection = _load_projection(file, options.dim, backbone.config.hidden_size)
        saved = read_leadkd_config(location) if os.path.isdir(location) else None
        if (options.dim is not None and projection is None and not allow_partial and saved
                and saved.get("kind") == KIND and saved.get("dim") is not None):
            raise LeadkdError(f"{location}: a saved ColBERT without its projection ({PROJECTION_FILE}); restore the "
                              "file, or load with allow_partial=True for a fresh one")
        return cls(tokenizer, backbone, options, projection).eval()

    @classmethod
    def _from_foreign(cls, foreign, overrides: dict, **loading) -> ColBERT:
        """A PyLate / ColBERTv2 checkpoint with its own settings (``overrides`` still win) and projection."""
        check_overrides(KIND, ColBERTOptions, overrides)
        tokenizer, backbone = load_backbone(foreign.backbone_path, **loading)
        hidden = backbone.config.hidden_size
        if foreign.projection.shape[1] != hidden:
            raise LeadkdError(f"{foreign.backbone_path}: the {foreign.format} projection takes width "
                              f"{foreign.projection.shape[1]}, but the encoder's hidden size is {hidden}")
        settings = {**foreign.options, "skiplist": skiplist_ids(foreign, tokenizer), **overrides}
        options = ColBERTOptions(**settings)
        projection = None
        if options.dim is not None:
            if options.dim != foreign.projection.shape[0]:
                raise ConfigError(f"ColBERT dim={options.dim} differs from the {foreign.format} checkpoint's "
                                  f"projection ({foreign.projection.shape[0]}); leave dim unset")
            projection = nn.Linear(hidden, options.dim, bias=False)
            with torch.no_grad():
                projection.weight.copy_(foreign.projection)
        logger.info("%s: a %s ColBERT (marker %s, query length %d, %d skiplist ids)", foreign.backbone_path,
                    foreign.format, options.marker_position, options.max_query_length, len(options.skiplist))
        return cls(tokenizer, backbone, options, projection).eval()

    @classmethod
    def from_config(cls, config, path: str | None = None) -> ColBERT:
        """From a :class:`~leadkd.config.ModelConfig`: ``colbert_dim`` 0 means no projection (the paper's)."""
        lengths = {key: value for key, value in (("max_query_length", config.max_query_length),
                                                 ("max_passage_length", config.max_passage_length)) if value}
        width: dict[str, Any] = {} if config.colbert_dim is None else {"dim": config.colbert_dim or None}
        return cls.from_pretrained(path or config.path, **lengths, **width, **loading_options(config))

    def save_pretrained(self, path: str | os.PathLike) -> None:
        """Write backbone (safetensors), tokenizer, projection and settings; the folder appears whole or not at all."""
        from safetensors.torch import save_file

        with atomic_directory(path) as tmp:
            self.backbone.save_pretrained(tmp)
            self.tokenizer.save_pretrained(tmp)
            if self.projection is not None:
                save_file({"weight": self.projection.weight.detach().cpu().contiguous()}, str(tmp / PROJECTION_FILE))
            write_leadkd_config(tmp, self.kind, self.settings())

    def settings(self) -> dict:
        """The options that, with the weights, define this model (what ``leadkd_config.json`` stores).

        The input-format options (marker position, expansion attention, query expansion, skiplist) are
        stored only where they differ from the paper's defaults, so a paper-style folder reads as before."""
        settings = dataclasses.asdict(self.options)
        for name in FORMAT_OPTIONS:
            if settings[name] == getattr(DEFAULT_OPTIONS, name):
                del settings[name]
        if "skiplist" in settings:
            settings["skiplist"] = list(settings["skiplist"])
        return settings

    # ------------------------------------------------------------------ tokenisation
    @property
    def device(self) -> torch.device:
        return next(self.backbone.parameters()).device

    def batch_tokenizer(self) -> ColBERTTokenizer:
        """This model's tokenisation as a picklable object (:mod:`~leadkd.models.batch_inputs`), for workers."""
        return ColBERTTokenizer(self.tokenizer, self.options.marker_position == MARKER_AFTER_CLS, self.query_length,
                                self.passage_length, self.query_marker_id, self.doc_marker_id, self.mask_id,
                                self.pad_id, self.options.query_expansion, self.options.attend_expansion)

    def tokenize_queries(self, queries: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """``(input_ids, attention_mask)``, ``[Q, max_query_length]``: [Q] marker, [MASK] padding, attended
        unless ``attend_expansion`` is off. Without ``query_expansion``: ``[Q, longest]``, [PAD] padding
        masked out."""
        ids, mask = self.batch_tokenizer().queries(queries)
        return ids.to(self.device), mask.to(self.device)

    def tokenize_passages(self, passages: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """``(input_ids, attention_mask)``, ``[P, longest]``: [D] marker, [PAD] padding masked out."""
        ids, mask = self.batch_tokenizer().passages(passages)
        return ids.to(self.device), mask.to(self.device)

    def _query_score_mask(self, ids: torch.Tensor, attention: torch.Tensor) -> torch.Tensor:
        """Query positions that count in MaxSim: all of them with expansion ([MASK]s included, attended or
        not), else only the real tokens."""
        if self.options.query_expansion:
            return torch.ones_like(ids)
        return attention

    def _passage_score_mask(self, ids: torch.Tensor, attention: torch.Tensor) -> torch.Tensor:
        """Passage positions MaxSim may pick: the real tokens minus the skiplist's ids."""
        if not self.options.skiplist:
            return attention
        skip = torch.isin(ids, self.skip_ids)
        return attention * (~skip).to(attention.dtype)

    # ------------------------------------------------------------------ per-layer states and scores
    def _final_states(self, last_hidden: torch.Tensor) -> torch.Tensor:
        """ColBERT's own token vectors: the last block's states projected (if ``dim``) and L2-normalised."""
        if self.projection is not None:
            last_hidden = self.projection(last_hidden)
        return F.normalize(last_hidden, p=2, dim=-1)

    def _layer_states(self, ids: torch.Tensor, mask: torch.Tensor, layers: Sequence[int] | None,
                      raw_last: bool = False, final: bool = False) -> list[torch.Tensor]:
        """States of each requested layer, then (``final``) ColBERT's final vectors, from one forward.

        Intermediate layers are raw block outputs. The last layer is ColBERT's final vectors unless
        ``raw_last``, which gives its raw block output like every other layer: that is the *layer view*
        the paper's code scores in LEAD's layer loss, while its response score keeps the final vectors.
        """
        only_final = final and layers is not None and len(layers) == 0
        wanted = [] if only_final else resolve_layers(layers, self.num_layers)
        last = self.num_layers - 1
        hidden = block_outputs(self.backbone, ids, mask, all_layers=any(layer != last for layer in wanted))
        finals = self._final_states(hidden[-1]) if final or (last in wanted and not raw_last) else None
        states = [finals if layer == last and not raw_last else hidden[layer - last - 1] for layer in wanted]
        # finals is None only where no state is taken from it (neither final nor an unraw last layer wanted)
        return cast("list[torch.Tensor]", states + [finals] if final else states)

    def query_layer_states(self, queries: Sequence[str], layers: Sequence[int] | None = None,
                           raw_last: bool = False, final: bool = False,
                           tokens: tuple[torch.Tensor, torch.Tensor] | None = None
                           ) -> tuple[list[torch.Tensor], torch.Tensor]:
        """One ``[Q, max_query_length, d_l]`` tensor per requested layer (a list: the final vectors' width is
        ``dim``, the others' the hidden size), and the query's score mask (all ones with
        ``query_expansion``: [MASK] pads count; else the real tokens, whose padding states are zeroed).
        ``raw_last`` and ``final``: see :meth:`_layer_states`; ``tokens``: the queries already tokenised."""
        ids, attention = self.tokenize_queries(queries) if tokens is None else tokens
        states = self._layer_states(ids, attention, layers, raw_last, final)
        mask = self._query_score_mask(ids, attention)
        if not self.options.query_expansion:  # zero vectors add exactly 0 to every MaxSim sum
            states = [state * mask.unsqueeze(-1).to(state.dtype) for state in states]
        return states, mask

    def passage_layer_states(self, passages: Sequence[str], layers: Sequence[int] | None = None,
                             raw_last: bool = False, final: bool = False,
                             tokens: tuple[torch.Tensor, torch.Tensor] | None = None
                             ) -> tuple[list[torch.Tensor], torch.Tensor]:
        """One ``[P, Tp, d_l]`` tensor per requested layer, and the ``[P, Tp]`` score mask (real tokens
        not in the skiplist).

        Whoever moves the states (e.g. an all-gather across processes) must move the mask with them."""
        ids, attention = self.tokenize_passages(passages) if tokens is None else tokens
        return self._layer_states(ids, attention, layers, raw_last, final), self._passage_score_mask(ids, attention)

    def layer_scores(self, queries: Sequence[str], passages: Sequence[str],
                     layers: Sequence[int] | None = None) -> torch.Tensor:
        """MaxSim of every query against every passage at each requested layer: ``[L', Q, P]``."""
        q_states, _ = self.query_layer_states(queries, layers)
        p_states, p_mask = self.passage_layer_states(passages, layers)
        return torch.stack([maxsim_scores(q, p, p_mask) for q, p in zip(q_states, p_states, strict=True)])

    def forward(self, queries: Sequence[str], passages: Sequence[str],
                layers: Sequence[int] | None = None) -> torch.Tensor:
        return self.layer_scores(queries, passages, layers)

    def encode_batch(self, queries: Sequence[str], passages: Sequence[str], layers: Sequence[int],
                     final: bool = False, raw_last_layer: bool = True,
                     inputs: dict[str, Any] | None = None) -> TokenBatch:
        """The training view: ``layers`` (the last one raw with ``raw_last_layer``), then ColBERT's final
        vectors with ``final``. ``inputs``: the texts already tokenised by :meth:`batch_tokenizer`."""
        q_tokens = p_tokens = None
        if inputs is not None:
            q, p = (inputs_to(inputs[side], self.device, non_blocking=True) for side in ("query", "passage"))
            q_tokens, p_tokens = (q["input_ids"], q["attention_mask"]), (p["input_ids"], p["attention_mask"])
        q_states, _ = self.query_layer_states(queries, layers, raw_last=raw_last_layer, final=final, tokens=q_tokens)
        p_states, p_mask = self.passage_layer_states(passages, layers, raw_last=raw_last_layer, final=final,
                                                     tokens=p_tokens)
        return TokenBatch(q_states, p_states, p_mask)

    def score(self, queries: Sequence[str], passages: Sequence[str]) -> torch.Tensor:
        """The ordinary ColBERT score (last layer), ``[Q, P]``."""
        return self.layer_scores(queries, passages, layers=[-1])[0]


def _seeded_projection(hidden: int, dim: int) -> nn.Linear:
    """A fresh bias-free projection, ``nn.Linear``'s uniform(±1/sqrt(hidden)) init from a fixed seed."""
    projection = nn.Linear(hidden, dim, bias=False)
    generator = torch.Generator().manual_seed(PROJECTION_SEED)
    bound = hidden ** -0.5
    with torch.no_grad():
        projection.weight.copy_(torch.rand(dim, hidden, generator=generator) * 2 * bound - bound)
    return projection


def _load_projection(file: Path, dim: int, hidden: int) -> nn.Linear:
    from safetensors.torch import load_file

    weights = load_file(str(file))
    weight = weights.get("weight")
    if weight is None or tuple(weight.shape) != (dim, hidden):
        found = None if weight is None else tuple(weight.shape)
        raise LeadkdError(f"{file}: projection weight has shape {found}, expected [dim={dim}, hidden={hidden}]")
    projection = nn.Linear(hidden, dim, bias=False)
    with torch.no_grad():
        projection.weight.copy_(weight)
    return projection
