"""Durable execution: a run advances by replaying its workflow from the top; recorded steps
return their recorded results, the first unrecorded call executes for real and is recorded."""
