"""The local services are real, reachable on loopback, and leave nothing behind when stopped."""

import pytest

from dragonfly_platform.services import (
    ServiceError,
    start_s3,
)


def test_s3_put_get_through_s3fs_and_pyarrow(s3_server):
    import s3fs

    fs = s3fs.S3FileSystem(skip_instance_cache=True, **s3_server.storage_options())
    fs.pipe("test-bucket/services/s3fs.bin", b"\x00\x01written by s3fs")
    pa_fs = s3_server.pyarrow_filesystem()
    # Written by one client, read by the other, both ways.
    with pa_fs.open_input_stream("test-bucket/services/s3fs.bin") as stream:
        assert stream.read() == b"\x00\x01written by s3fs"
    with pa_fs.open_output_stream("test-bucket/services/arrow.bin") as stream:
        stream.write(b"written by pyarrow")
    assert fs.cat("test-bucket/services/arrow.bin") == b"written by pyarrow"
    assert sorted(fs.ls("test-bucket/services")) == [
        "test-bucket/services/arrow.bin",
        "test-bucket/services/s3fs.bin",
    ]


def test_create_bucket_is_idempotent(s3_server):
    s3_server.create_bucket("made-by-test")
    s3_server.create_bucket("made-by-test")
    names = [bucket["Name"] for bucket in s3_server.client().list_buckets()["Buckets"]]
    assert "made-by-test" in names and "test-bucket" in names


def test_s3_env_reaches_code_that_reads_the_aws_environment(s3_env):
    import botocore.session

    client = botocore.session.get_session().create_client("s3")  # no explicit endpoint or keys
    client.put_object(Bucket="test-bucket", Key="env/hello.txt", Body=b"hi")
    assert client.get_object(Bucket="test-bucket", Key="env/hello.txt")["Body"].read() == b"hi"


def test_killed_s3_server_gives_client_errors_then_recovers_on_restart(tmp_path):
    import botocore.exceptions
    import s3fs

    server = start_s3(tmp_path / "s3")
    try:
        server.create_bucket("doomed")
        server.client().put_object(Bucket="doomed", Key="k", Body=b"v")
        server.kill()
        assert not server.process.alive()

        # Few retries, short timeouts: the failure surfaces as an error, not a hang.
        with pytest.raises(botocore.exceptions.EndpointConnectionError):
            server.client(retries=2, timeout=2).get_object(Bucket="doomed", Key="k")
        options = server.storage_options()
        options["config_kwargs"] = {
            **options["config_kwargs"],
            "retries": {"max_attempts": 2},
            "connect_timeout": 2,
        }
        fs = s3fs.S3FileSystem(skip_instance_cache=True, **options)
        with pytest.raises(botocore.exceptions.EndpointConnectionError):
            fs.cat("doomed/k")

        server.restart()
        if server.backend == "seaweedfs":  # moto keeps objects in memory only
            assert server.client().get_object(Bucket="doomed", Key="k")["Body"].read() == b"v"
        else:
            server.create_bucket("doomed")
            server.client().put_object(Bucket="doomed", Key="k", Body=b"v")
    finally:
        server.stop()
    assert server.process.leftovers() == []


def test_mlflow_server_logs_a_run_and_reads_it_back(mlflow_server, s3_server):
    import mlflow
    import s3fs
    from mlflow import MlflowClient

    client = MlflowClient(mlflow_server.tracking_uri)
    experiment_id = client.create_experiment("services-test")
    run = client.create_run(experiment_id)
    client.log_param(run.info.run_id, "lr", "0.001")
    for step, loss in enumerate([2.0, 1.5, 1.25]):
        client.log_metric(run.info.run_id, "loss", loss, step=step)
    mlflow.set_tracking_uri(mlflow_server.tracking_uri)
    client.log_text(run.info.run_id, "tiny note", "notes/readme.txt")
    client.set_terminated(run.info.run_id)

    fetched = MlflowClient(mlflow_server.tracking_uri).get_run(run.info.run_id)
    assert fetched.data.params == {"lr": "0.001"}
    assert [m.value for m in client.get_metric_history(run.info.run_id, "loss")] == [2.0, 1.5, 1.25]
    assert fetched.info.status == "FINISHED"
    # Artifacts go through the server to the S3 bucket.
    fs = s3fs.S3FileSystem(skip_instance_cache=True, **s3_server.storage_options())
    stored = fs.find(f"mlflow/artifacts/{experiment_id}/{run.info.run_id}")
    assert [path.rsplit("/", 2)[-2:] for path in stored] == [["notes", "readme.txt"]]
    assert fs.cat(stored[0]) == b"tiny note"


def test_start_s3_rejects_unknown_backend(tmp_path):
    with pytest.raises(ValueError, match="minio"):
        start_s3(tmp_path, backend="minio")


def test_taken_port_is_refused_before_start(tmp_path):
    # Otherwise the health check would pass against the server already on that port.
    first = start_s3(tmp_path / "a", backend="moto")
    try:
        port = int(first.endpoint_url.rsplit(":", 1)[1])
        with pytest.raises(ServiceError, match=f"port {port} .* already in use"):
            start_s3(tmp_path / "b", port=port, backend="moto")
    finally:
        first.stop()
