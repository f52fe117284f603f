"""The stream: tasks, scenarios, and the configured tasks (or a user's Avalanche benchmark) as one Avalanche
benchmark."""
