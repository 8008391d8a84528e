from logitcache.cli import main

main()
