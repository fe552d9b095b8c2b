"""Client side of secure aggregation: the adapter below Flower's ``secaggplus_mod``.

Flower ships SecAgg+ for its legacy message format only: the server's
``SecAggPlusWorkflow`` sends ``fitins.*`` records and ``secaggplus_mod`` expects a
``fitres.*`` reply from the handler it wraps, which it then weights, clips, quantizes
and masks before anything leaves the client. :func:`legacy_train_adapter` sits between
that mod and the project's Message-API train handler:

* in: ``fitins.parameters`` (unnamed arrays) + ``fitins.config`` become the
  ``arrays`` (named again, from :data:`NAMES_KEY`) and ``config`` records the handler
  reads;
* out: the handler's new weights become the *update* ``new - global`` (small values,
  so the workflow's ``clipping_range`` is a meaningful per-coordinate bound and its
  quantization step is fine) and the FitRes ``num_examples`` becomes the aggregation
  weight the server's policy assigned (:data:`WEIGHT_KEY`): ``secaggplus_mod``
  multiplies the update by ``num_examples / max_weight`` *before* masking, so the
  unmasked sum the server sees is already the policy-weighted mean.

The client's real metrics (examples, loss, duration, partition id) travel in
``fitres.metrics``, which the workflow passes to the server's strategy unmasked.
"""

from __future__ import annotations

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.clientapp.typing import ClientAppCallable
from flwr.common import (
    Code,
    FitRes,
    Status,
    ndarrays_to_parameters,
    parameters_to_ndarrays,
)
from flwr.compat.common import recorddict_compat as compat

#: Config key with the model's array names, comma-separated (legacy FitIns configs
#: hold scalars only, and legacy Parameters carry no names).
NAMES_KEY = "secagg-names"
#: Config key with the integer aggregation weight the server assigned this client.
WEIGHT_KEY = "secagg-weight"
#: Metric the client echoes so the server can check the weight it used.
USED_WEIGHT_KEY = "secagg-weight-used"

_FITINS_PARAMS = "fitins.parameters"
_FITINS_CONFIG = "fitins.config"


class SecAggAdapterError(ValueError):
    """A SecAgg+ train message this adapter cannot translate; says which key."""


def is_legacy_train(msg: Message) -> bool:
    """Return True if ``msg`` carries a legacy ``fitins`` (the SecAgg+ workflow)."""
    return _FITINS_PARAMS in msg.content.array_records


def to_message_api(content: RecordDict) -> tuple[RecordDict, list[str], int]:
    """Return the Message-API content, the array names and the assigned weight."""
    fitins = compat.recorddict_to_fitins(content, keep_input=True)
    config = dict(fitins.config)
    names_value = config.pop(NAMES_KEY, None)
    weight = config.pop(WEIGHT_KEY, None)
    if not isinstance(names_value, str) or not names_value:
        raise SecAggAdapterError(f"SecAgg+ train config lacks {NAMES_KEY!r}")
    if not isinstance(weight, int) or isinstance(weight, bool) or weight < 0:
        raise SecAggAdapterError(
            f"SecAgg+ train config {WEIGHT_KEY!r} must be an integer >= 0, got "
            f"{weight!r}"
        )
    names = names_value.split(",")
    ndarrays = parameters_to_ndarrays(fitins.parameters)
    if len(ndarrays) != len(names):
        raise SecAggAdapterError(
            f"{len(ndarrays)} arrays but {len(names)} names in {NAMES_KEY!r}"
        )
    arrays = ArrayRecord(
        {n: Array(np.asarray(a)) for n, a in zip(names, ndarrays, strict=True)}
    )
    return (
        RecordDict({"arrays": arrays, "config": ConfigRecord(config)}),  # type: ignore[arg-type]
        names,
        weight,
    )


def to_fitres(
    reply: RecordDict, global_arrays: ArrayRecord, names: list[str], weight: int
) -> RecordDict:
    """Return the legacy ``fitres`` content: the update, the weight, the metrics."""
    new = reply["arrays"]
    if not isinstance(new, ArrayRecord) or list(new.keys()) != names:
        raise SecAggAdapterError("the train handler's reply lacks the model's arrays")
    update = [
        (new[n].numpy() - global_arrays[n].numpy()).astype(np.float32) for n in names
    ]
    metrics = {
        str(k): v for rec in reply.metric_records.values() for k, v in rec.items()
    }
    metrics[USED_WEIGHT_KEY] = weight
    fitres = FitRes(
        status=Status(code=Code.OK, message="ok"),
        parameters=ndarrays_to_parameters(update),
        num_examples=weight,
        metrics=metrics,  # type: ignore[arg-type]
    )
    return compat.fitres_to_recorddict(fitres, keep_input=True)


def legacy_train_adapter(
    msg: Message, ctxt: Context, call_next: ClientAppCallable
) -> Message:
    """Translate a SecAgg+ ``fitins`` for the train handler and its reply back.

    Messages in the Message-API format pass through untouched.
    """
    if not is_legacy_train(msg):
        return call_next(msg, ctxt)
    content, names, weight = to_message_api(msg.content)
    global_arrays = content["arrays"]
    assert isinstance(global_arrays, ArrayRecord)
    msg.content = content
    reply = call_next(msg, ctxt)
    if reply.has_error():
        return reply
    return Message(to_fitres(reply.content, global_arrays, names, weight), reply_to=msg)
