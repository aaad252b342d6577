from smallgpt.cli import main

main()
