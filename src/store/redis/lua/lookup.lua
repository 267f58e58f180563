-- KEYS: record. ARGV: pin.
return reply('rec', now_ms(ARGV[1]), fields(KEYS[1]))
