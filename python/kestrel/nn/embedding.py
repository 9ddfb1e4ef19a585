"""StableEmbedding: bitsandbytes' embedding for 8-bit training (Dettmers et al., 2021).

An nn.Embedding with xavier-uniform initialisation and a LayerNorm after the lookup, whose weight always keeps
32-bit optimizer state (registered with GlobalOptimManager): the stable embedding layer of the 8-bit optimizers
paper.
"""

import torch
import torch.nn.functional as F

from ..optim.manager import GlobalOptimManager


class StableEmbedding(torch.nn.Embedding):
    def __init__(
        self,
        num_embeddings,
        embedding_dim,
        padding_idx=None,
        max_norm=None,
        norm_type=2.0,
        scale_grad_by_freq=False,
        sparse=False,
        _weight=None,
        device=None,
        dtype=None,
    ):
        super().__init__(
            num_embeddings,
            embedding_dim,
            padding_idx=padding_idx,
            max_norm=max_norm,
            norm_type=norm_type,
            scale_grad_by_freq=scale_grad_by_freq,
            sparse=sparse,
            _weight=_weight,
            device=device,
            dtype=dtype,
        )
        self.norm = torch.nn.LayerNorm(embedding_dim, device=device)
        GlobalOptimManager.get_instance().register_module_override(self, "weight", {"optim_bits": 32})

    def reset_parameters(self):
        torch.nn.init.xavier_uniform_(self.weight)
        self._fill_padding_idx_with_zero()

    def forward(self, input):
        emb = F.embedding(
            input, self.weight, self.padding_idx, self.max_norm, self.norm_type, self.scale_grad_by_freq, self.sparse
        )
        # LayerNorm in its own parameters' dtype (float32 unless the module was cast, e.g. .double()), then back to
        # the weight's dtype: bnb's float32 LayerNorm for bf16/fp16 weights
        return self.norm(emb.to(self.norm.weight.dtype)).to(self.weight.dtype)
