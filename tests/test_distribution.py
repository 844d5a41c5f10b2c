"""trainer.strategy: the tf.distribute switch of the training entry point.

The mirrored run needs two logical CPU devices, which must be configured before TensorFlow
initialises its devices: it runs in a fresh Python process.
"""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from test_train import compose_train, smoke_overrides

from radlogics_repro import train

REPO = Path(__file__).resolve().parents[1]

TRAIN_RUN = """
import json, sys
from hydra import compose, initialize_config_module
from radlogics_repro import train

with initialize_config_module(config_module="conf", version_base="1.3"):
    cfg = compose("train", overrides=json.loads(sys.argv[1]))
print("RESULT " + json.dumps(train.train(cfg)["distribution"]))
"""

MIRRORED_RUN = """
import json, sys
import tensorflow as tf

cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)

from hydra import compose, initialize_config_module
from radlogics_repro import train

seen = {}
compile_model = train.compile_model

def recording_compile(model, *args, **kwargs):
    variable = model.trainable_variables[0].value
    seen["model_replicas"] = model.distribute_strategy.num_replicas_in_sync
    seen["mirrored_variable"] = isinstance(variable, tf.distribute.DistributedValues)
    return compile_model(model, *args, **kwargs)

train.compile_model = recording_compile
with initialize_config_module(config_module="conf", version_base="1.3"):
    cfg = compose("train", overrides=json.loads(sys.argv[1]))
result = train.train(cfg)
print("RESULT " + json.dumps({**result["distribution"], **seen}))
"""


def test_default_strategy_config_and_unknown_name():
    import tensorflow as tf

    cfg = compose_train(["+experiment=lung_unet"])
    assert cfg.trainer.strategy == "default"
    assert train.distribution_strategy("default") is tf.distribute.get_strategy()
    with pytest.raises(train.TrainingError, match="trainer.strategy='ring'"):
        train.distribution_strategy("ring")


def test_mirrored_strategy_trains_over_two_logical_cpus(tiny_dataset, tmp_path):
    run_dir = tmp_path / "run"
    overrides = smoke_overrides("lung_unet", tiny_dataset, run_dir, extra=[
        "trainer.strategy=mirrored", "trainer.max_cases_per_split=1", "trainer.epochs=1",
        "data.slice_step_mm=40", "trainer.max_val_slices_per_epoch=4"])  # 4 steps: seconds
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    done = subprocess.run([sys.executable, "-c", MIRRORED_RUN, json.dumps(overrides)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    line = next(s for s in done.stdout.splitlines() if s.startswith("RESULT "))
    result = json.loads(line.removeprefix("RESULT "))
    assert result == {"strategy": "mirrored", "replicas": 2, "global_batch_size": 2,
                      "model_replicas": 2, "mirrored_variable": True}
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["distribution"]["replicas"] == 2
    assert (run_dir / "model.keras").exists()
    assert 0.0 <= metrics["metrics"]["val"]["dice_mean"] <= 1.0


def _free_ports(n):
    sockets = [socket.socket() for _ in range(n)]
    for sock in sockets:
        sock.bind(("127.0.0.1", 0))
    ports = [sock.getsockname()[1] for sock in sockets]
    for sock in sockets:
        sock.close()
    return ports


@pytest.mark.slow
def test_multi_worker_strategy_trains_two_local_workers_in_step(tiny_dataset, tmp_path):
    """Two worker processes on this machine (loopback only), cluster from TF_CONFIG."""
    import keras
    import pandas as pd

    workers = [f"localhost:{port}" for port in _free_ports(2)]
    procs = []
    for index in range(2):
        overrides = smoke_overrides("lung_unet", tiny_dataset, tmp_path / f"worker{index}", extra=[
            "trainer.strategy=multi_worker", "trainer.max_cases_per_split=1", "data.slice_step_mm=40",
            "trainer.max_val_slices_per_epoch=4"])
        tf_config = {"cluster": {"worker": workers}, "task": {"type": "worker", "index": index}}
        env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "TF_CONFIG": json.dumps(tf_config)}
        procs.append(subprocess.Popen([sys.executable, "-c", TRAIN_RUN, json.dumps(overrides)], cwd=REPO,
                                      env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    outputs = [proc.communicate(timeout=600) for proc in procs]
    for proc, (_, stderr) in zip(procs, outputs, strict=True):
        assert proc.returncode == 0, stderr[-3000:]
    for stdout, _ in outputs:
        line = next(s for s in stdout.splitlines() if s.startswith("RESULT "))
        assert json.loads(line.removeprefix("RESULT ")) == {"strategy": "multi_worker", "replicas": 2,
                                                            "global_batch_size": 2}
    histories = [pd.read_csv(tmp_path / f"worker{i}" / "history.csv") for i in range(2)]
    assert len(histories[0]) == 2
    pd.testing.assert_frame_equal(histories[0], histories[1])  # synchronous: the same model
    # trainable weights are mirrored across the workers (BatchNorm's moving statistics are each
    # worker's own, from its share of the batches)
    models_ = [keras.saving.load_model(tmp_path / f"worker{i}" / "model.keras") for i in range(2)]
    weights = [[w.numpy() for w in m.trainable_weights] for m in models_]
    assert all((a == b).all() for a, b in zip(*weights, strict=True))
