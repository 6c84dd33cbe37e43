"""The video tools: ffprobe facts, the frame reader, the ffmpeg writer, and the threads that keep them busy.

Nothing here knows about the model, S3 or jobs."""
