"""The base class of the modules that a ResNet block hosts on its residual branch."""
from torch import nn

__all__ = ["ResidualContextModule"]


class ResidualContextModule(nn.Module):
    """A shape-preserving module applied to the output of a block's last conv + norm.

    The hosting block calls it through a forward hook on that conv (see
    :func:`acm_d2.modeling.resnet.insert_context_modules`), so Detectron2's block classes and
    their parameter names stay unchanged. The hook is a bound method, so ``copy.deepcopy``
    and pickling of the model keep it pointing at the copied module.
    """

    def apply_to_output(self, conv: nn.Module, inputs, output):
        """Forward hook: replaces the conv's output (N, C, H, W) by this module's output."""
        return self(output)
