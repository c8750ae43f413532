"""The overlap hook as deepseek-ai/DualPipe's examples write it (forward of one chunk, then backward of the other):
shared by the executor and compatibility tests, whose stage classes only count how often the hook is called."""
import torch

from schedules.weight_grad import run_backward


def sequential_overlapped_forward_backward(module0, inputs0, criterion0, labels0, module1, loss1, outputs1,
                                           output_grads1):
    outputs0 = module0(*inputs0)
    outputs0 = [outputs0] if isinstance(outputs0, torch.Tensor) else outputs0
    loss0 = criterion0(*outputs0, *labels0) if criterion0 is not None else None
    if loss1 is not None:
        loss1.backward()
        loss1.detach_()
    else:
        run_backward(outputs1, output_grads1)
    return outputs0, loss0
