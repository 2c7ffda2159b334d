"""Withdrawal: what it does to a participant, their reminders and their responses, in one place."""
