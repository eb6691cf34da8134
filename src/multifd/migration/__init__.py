"""The migration engine: sources, destinations, rounds, channel threads, compression."""
