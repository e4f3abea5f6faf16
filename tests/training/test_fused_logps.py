"""fused_logps: per-token log-probs through a frozen head equal the plain log_softmax path in value
and in the gradient to the hidden states, for any per-token incoming gradient."""

import pytest
import torch

from lorakit.training.fused_logps import frozen_head_token_logps


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("chunk_elements", [64, 2**20])  # many chunks of 16 rows / one chunk
def test_values_and_hidden_gradients_equal_the_plain_path(bias, chunk_elements):
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(37, 16, generator=generator, requires_grad=True)
    weight = torch.randn(50, 16, generator=generator)
    b = torch.randn(50, generator=generator) if bias else None
    targets = torch.randint(0, 50, (37,), generator=generator)
    upstream = torch.randn(37, generator=generator)  # a different incoming gradient per token

    fused = frozen_head_token_logps(hidden, weight, b, targets, chunk_elements=chunk_elements)
    (fused * upstream).sum().backward()
    fused_grad, hidden.grad = hidden.grad.clone(), None
    plain = torch.log_softmax(torch.nn.functional.linear(hidden, weight, b), -1).gather(1, targets[:, None]).squeeze(1)
    (plain * upstream).sum().backward()
    torch.testing.assert_close(fused, plain, atol=1e-5, rtol=0)
    torch.testing.assert_close(fused_grad, hidden.grad, atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        torch.testing.assert_close(frozen_head_token_logps(hidden, weight, b, targets), plain, atol=1e-5, rtol=0)


def test_a_trained_head_is_refused():
    weight = torch.randn(5, 3, requires_grad=True)
    with pytest.raises(ValueError, match="frozen head"):
        frozen_head_token_logps(torch.randn(2, 3), weight, None, torch.tensor([0, 1]))
