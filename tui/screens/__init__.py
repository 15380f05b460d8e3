"""The app's screens, one per mode: dashboard, models, data, chat, activity."""

from .activity import ActivityScreen
from .chat import ChatScreen
from .dashboard import DashboardScreen
from .data import DataScreen
from .models import ModelsScreen

__all__ = ["ActivityScreen", "ChatScreen", "DashboardScreen", "DataScreen", "ModelsScreen"]
