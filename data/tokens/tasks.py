"""The task registry: every task the platform lays out, trains, samples and reports on
(REFERENCE §2 prompts; the message builders are in :mod:`omnidiff.data.tokens.sequences`)."""

TASKS = ("captioning", "vqa", "text_to_image", "asr", "tts", "speech_to_image", "spoken_vqa",
         "text")
