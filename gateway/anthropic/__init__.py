"""The Anthropic Messages API intake (`/v1/messages`): its request as a chat
request to the engines, its answer and events in Anthropic's shapes."""
