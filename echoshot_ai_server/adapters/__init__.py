"""The worker's neighbours, one small class each, speaking our words: SQS (the queue), S3 (storage),
Spring (the callback), Auto Scaling and CloudWatch. Their libraries' errors are translated here."""
