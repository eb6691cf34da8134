"""Offline analysis of recorded migrations: every channel decoded, RAM rebuilt."""

from .recording import Recording, RecordingError, load_recording
from .replay import Analysis, ChannelStats, RoundStats, analyze, check_extract_folder

__all__ = [
    "Analysis",
    "ChannelStats",
    "Recording",
    "RecordingError",
    "RoundStats",
    "analyze",
    "check_extract_folder",
    "load_recording",
]
