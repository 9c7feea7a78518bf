"""The guest agent: PID 1 of every husk VM. Standard library only."""
