"""Client side: one client's state, and the code that answers the server's messages.

``state`` holds what a client owns (adapter, head, optimizer, data); ``training`` trains and
evaluates it; ``probe`` computes its fingerprint and module importance (Phases 1 and 2);
``batched`` trains clients of equal batch sizes as one batched step (``train.batch_clients``);
``runtime`` answers a plan (``atlasfl.messages``) with a reply, the same code in-process and on
Flower.
"""

from atlasfl.client.runtime import ClientRuntime, client_seed
from atlasfl.client.state import ClientState, make_client
from atlasfl.client.training import evaluate, forward_logits, task_loss, train_client

__all__ = ["ClientRuntime", "ClientState", "client_seed", "evaluate", "forward_logits",
           "make_client", "task_loss", "train_client"]
