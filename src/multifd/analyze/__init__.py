"""Offline analysis of recorded migrations: every channel decoded, RAM rebuilt."""

from .recording import Recording, load_recording
from .replay import Analysis, ChannelStats, RoundStats, analyze

__all__ = ["Analysis", "ChannelStats", "Recording", "RoundStats", "analyze", "load_recording"]
