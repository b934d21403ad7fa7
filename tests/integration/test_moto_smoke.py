"""The moto server fixture is a real HTTP endpoint with SQS visibility semantics."""

import boto3


def test_sqs_visibility_round_trip(moto_server):
    sqs = boto3.client("sqs")
    url = sqs.create_queue(QueueName="smoke", Attributes={"VisibilityTimeout": "60"})["QueueUrl"]
    assert url.startswith(moto_server.endpoint) or "smoke" in url
    sqs.send_message(QueueUrl=url, MessageBody="x")
    first = sqs.receive_message(QueueUrl=url, MaxNumberOfMessages=1)["Messages"][0]
    assert "Messages" not in sqs.receive_message(QueueUrl=url, WaitTimeSeconds=0)
    sqs.change_message_visibility(QueueUrl=url, ReceiptHandle=first["ReceiptHandle"], VisibilityTimeout=0)
    again = sqs.receive_message(QueueUrl=url, WaitTimeSeconds=0)["Messages"][0]
    assert again["MessageId"] == first["MessageId"]


def test_reset_wipes_state(moto_server):
    sqs = boto3.client("sqs")
    assert sqs.list_queues().get("QueueUrls", []) == []
